using System.Globalization;
using System.Runtime.InteropServices;

namespace Distributed.Cluster;

/// <summary>
/// Pins each MPI rank of a host to its own share of the host's cores, so that ranks sharing a host do not
/// migrate between cores and get unequal CPU. Unpinned, four ranks on two cores got compute times from 353 to
/// 683 ms in the same ring step, and every fast rank's wait for a slow neighbour counts against overlap; pinned
/// (restarted inside the share, <see cref="RestartPinned"/>), 478–511 ms. Whole physical cores are handed out (SMT siblings stay together): with L local ranks and C cores
/// each rank gets C / L of them; with more ranks than cores, rank l gets core <c>l mod C</c>.
/// </summary>
/// <remarks>
/// Applied only on Linux, under MPI with more than one rank on the host, and only when the process may run on
/// every online CPU (nobody bound it): a binding from <c>mpiexec -bind-to</c>, Slurm or <c>taskset</c> is
/// left as it is. <c>DSATTN_BIND=off</c> turns it off; <c>DSATTN_BIND=auto</c> is the default.
/// Every thread the process has is pinned (threads started later inherit the mask).
/// </remarks>
public static unsafe class RankAffinity
{
    /// <summary>The environment variable: <c>auto</c> (default) or <c>off</c>.</summary>
    public const string EnvironmentVariable = "DSATTN_BIND";

    private const int MaskWords = 16; // 1,024 CPUs

    /// <summary>What <see cref="Apply"/> did: e.g. "cores 0-3", or why it left the affinity alone.</summary>
    public static string Description { get; private set; } = "not pinned";

    /// <summary>The CPUs this process may run on now (Linux), in ascending order; null elsewhere.</summary>
    public static IReadOnlyList<int>? AllowedCpus()
    {
        if (!OperatingSystem.IsLinux()) return null;
        var mask = stackalloc ulong[MaskWords];
        if (sched_getaffinity(0, MaskWords * sizeof(ulong), mask) != 0) return null;
        var cpus = new List<int>();
        for (int i = 0; i < MaskWords * 64; i++)
            if ((mask[i / 64] & (1UL << (i % 64))) != 0) cpus.Add(i);
        return cpus;
    }

    /// <summary>
    /// Pins this process to its local rank's share of the host's cores when <paramref name="launch"/> is an
    /// MPI rank with others on its host. Returns <see cref="Description"/>.
    /// </summary>
    /// <exception cref="InvalidOperationException"><c>DSATTN_BIND</c> holds something other than auto or off.</exception>
    public static string Apply(LaunchEnvironment launch)
    {
        ArgumentNullException.ThrowIfNull(launch);
        string mode = Mode() ?? throw new InvalidOperationException($"{EnvironmentVariable}={Environment.GetEnvironmentVariable(EnvironmentVariable)} is not a binding mode: use auto (pin each MPI rank to its share of the host's cores, the default) or off.");
        // Restarted inside its share: report the mask the process really has.
        if (Environment.GetEnvironmentVariable(RestartedVariable) is not null) return Description = AllowedCpus() is { } now ? $"cores {Ranges(now)}" : "not pinned";
        if (mode == "off") return Description = $"not pinned ({EnvironmentVariable}=off)";
        if (MyShare(launch) is not { } mine) return Description = AllowedCpus() is { } a && OnlineCpus() is { } o && a.Count < o.Count ? "bound by the launcher" : "not pinned";
        PinAllThreads(mine);
        _pinned = mine.Length;
        return Description = $"cores {Ranges(mine)}";
    }

    private static int _pinned;

    /// <summary>
    /// Kernel threads for one of <paramref name="ranksHere"/> ranks on this host: the CPUs of its share when this
    /// class pinned it (now or by <see cref="RestartPinned"/>), else the process's CPUs divided among the ranks.
    /// </summary>
    public static int ThreadsPerRank(int ranksHere)
    {
        if (Environment.GetEnvironmentVariable(RestartedVariable) is { } restarted)
        {
            try
            {
                return Math.Max(1, ParseList(restarted).Count);
            }
            catch (FormatException)
            {
            }
        }
        return _pinned > 0 ? _pinned : Math.Max(1, Environment.ProcessorCount / Math.Max(1, ranksHere));
    }

    /// <summary>
    /// For an executable's first line: when this process is an MPI rank that <see cref="Apply"/> would pin, pins
    /// the calling thread and executes the same command line again, so that the runtime starts inside its
    /// share. The runtime sizes itself at start-up from the CPUs it may use (its processor count sets how
    /// long waits spin before they sleep): 4 ranks on 2 cores pinned after start-up kept a runtime sized for
    /// 2 CPUs and hid 53–90% of a ring's emulated link (7 rounds), against 89–90% (6 rounds, and steadier
    /// compute) with the runtime sized for the one core they run on. Returns without doing anything when nothing is to be done, and also when the exec fails
    /// (then <see cref="Apply"/> pins the running process).
    /// </summary>
    public static void RestartPinned()
    {
        if (!OperatingSystem.IsLinux() || Environment.GetEnvironmentVariable(RestartedVariable) is not null || Mode() != "auto") return;
        if (MyShare(LaunchEnvironment.Detect()) is not { } mine) return;
        string[] argv;
        try
        {
            argv = File.ReadAllText("/proc/self/cmdline").Split('\0', StringSplitOptions.None)[..^1];
        }
        catch (IOException)
        {
            return;
        }
        if (argv.Length == 0) return;
        var mask = stackalloc ulong[MaskWords];
        SetMask(mine, mask);
        if (sched_setaffinity(0, MaskWords * sizeof(ulong), mask) != 0) return;
        var env = Environment.GetEnvironmentVariables().Cast<System.Collections.DictionaryEntry>()
            .Select(e => $"{e.Key}={e.Value}").Append($"{RestartedVariable}={Ranges(mine)}");
        nint[] a = [.. argv.Select(Marshal.StringToCoTaskMemUTF8), 0], e = [.. env.Select(Marshal.StringToCoTaskMemUTF8), 0];
        fixed (nint* pa = a, pe = e) _ = execve("/proc/self/exe", pa, pe);
        // Only reached when the exec failed: the process goes on, and Apply pins its other threads.
    }

    /// <summary>Set (to the CPU list) in the environment of a process that <see cref="RestartPinned"/> started.</summary>
    public const string RestartedVariable = "DSATTN_BOUND_CPUS";

    private static string? Mode()
    {
        string mode = Environment.GetEnvironmentVariable(EnvironmentVariable) ?? "auto";
        return mode is "auto" or "off" ? mode : null;
    }

    /// <summary>The CPUs this rank should run on, or null when it should be left alone (not an MPI rank with
    /// others on its host, not Linux, or already bound by someone).</summary>
    private static int[]? MyShare(LaunchEnvironment launch)
    {
        if (!OperatingSystem.IsLinux() || launch.Kind != LaunchKind.Mpich || launch.LocalSize < 2 || launch.LocalRank < 0) return null;
        var allowed = AllowedCpus();
        var online = OnlineCpus();
        if (allowed is null || online is null || allowed.Count < online.Count) return null;
        return Share(Cores(allowed), launch.LocalRank, launch.LocalSize);
    }

    /// <summary>The CPUs of local rank <paramref name="localRank"/> of <paramref name="localSize"/>, given the
    /// host's cores (each a list of its hardware threads).</summary>
    internal static int[] Share(IReadOnlyList<int[]> cores, int localRank, int localSize)
    {
        if (localSize <= cores.Count)
        {
            int per = cores.Count / localSize;
            return [.. cores.Skip(localRank * per).Take(per).SelectMany(c => c)];
        }
        return cores[localRank % cores.Count];
    }

    /// <summary>The allowed CPUs grouped by physical core (package, core id), in order of their first CPU.</summary>
    private static List<int[]> Cores(IReadOnlyList<int> cpus) =>
        [.. cpus.GroupBy(c => (Package: ReadTopology(c, "physical_package_id"), Core: ReadTopology(c, "core_id") ?? -1 - c))
                .Select(g => g.OrderBy(c => c).ToArray())
                .OrderBy(g => g[0])];

    private static int? ReadTopology(int cpu, string name)
    {
        try
        {
            return int.Parse(File.ReadAllText($"/sys/devices/system/cpu/cpu{cpu}/topology/{name}").Trim(), CultureInfo.InvariantCulture);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException)
        {
            return null;
        }
    }

    private static List<int>? OnlineCpus()
    {
        try
        {
            return ParseList(File.ReadAllText("/sys/devices/system/cpu/online"));
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException)
        {
            return null;
        }
    }

    /// <summary>Parses a kernel CPU list such as "0-3,8,10-11".</summary>
    internal static List<int> ParseList(string text)
    {
        var cpus = new List<int>();
        foreach (var part in text.Trim().Split(',', StringSplitOptions.RemoveEmptyEntries))
        {
            var ends = part.Split('-');
            int first = int.Parse(ends[0], CultureInfo.InvariantCulture), last = ends.Length > 1 ? int.Parse(ends[1], CultureInfo.InvariantCulture) : first;
            for (int c = first; c <= last; c++) cpus.Add(c);
        }
        return cpus;
    }

    /// <summary>Writes CPUs as a kernel CPU list ("0-3,8").</summary>
    internal static string Ranges(IReadOnlyList<int> cpus)
    {
        var parts = new List<string>();
        for (int i = 0; i < cpus.Count;)
        {
            int j = i;
            while (j + 1 < cpus.Count && cpus[j + 1] == cpus[j] + 1) j++;
            parts.Add(i == j ? cpus[i].ToString(CultureInfo.InvariantCulture) : FormattableString.Invariant($"{cpus[i]}-{cpus[j]}"));
            i = j + 1;
        }
        return string.Join(',', parts);
    }

    /// <summary>Sets the mask of every thread of the process (sched_setaffinity is per thread on Linux).</summary>
    private static void PinAllThreads(IReadOnlyList<int> cpus)
    {
        var mask = stackalloc ulong[MaskWords];
        SetMask(cpus, mask);
        foreach (var dir in Directory.GetDirectories("/proc/self/task"))
            if (int.TryParse(Path.GetFileName(dir), NumberStyles.None, CultureInfo.InvariantCulture, out int tid))
                _ = sched_setaffinity(tid, MaskWords * sizeof(ulong), mask); // a thread that just ended fails harmlessly
    }

    /// <summary>Sets the bits of <paramref name="cpus"/> in a zeroed mask of <see cref="MaskWords"/> words.</summary>
    private static void SetMask(IReadOnlyList<int> cpus, ulong* mask)
    {
        foreach (int c in cpus) mask[c / 64] |= 1UL << (c % 64);
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int execve([MarshalAs(UnmanagedType.LPUTF8Str)] string path, nint* argv, nint* envp);

    [DllImport("libc", SetLastError = true)]
    private static extern int sched_getaffinity(int pid, nint cpusetsize, ulong* mask);

    [DllImport("libc", SetLastError = true)]
    private static extern int sched_setaffinity(int pid, nint cpusetsize, ulong* mask);
}
