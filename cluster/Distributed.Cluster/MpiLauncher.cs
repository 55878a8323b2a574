using System.Diagnostics;
using System.Text;

namespace Distributed.Cluster;

/// <summary>What a finished launch printed.</summary>
/// <param name="ExitCode">The launcher's exit code (-1 when it was killed at the timeout).</param>
/// <param name="Stdout">Everything written to standard output.</param>
/// <param name="Stderr">Everything written to standard error.</param>
/// <param name="TimedOut">The timeout elapsed and the whole process tree was killed.</param>
/// <param name="Elapsed">Wall time.</param>
public sealed record LaunchResult(int ExitCode, string Stdout, string Stderr, bool TimedOut, TimeSpan Elapsed);

/// <summary>
/// Finds MPICH's <c>mpiexec</c>, builds its command line, and runs jobs with a timeout that kills the
/// whole process tree (mpiexec, its proxies and every rank).
/// </summary>
public static class MpiLauncher
{
    /// <summary>
    /// The MPICH launcher: <c>mpiexec.mpich</c> when on PATH (Debian installs Open MPI's as plain
    /// <c>mpiexec</c> when both are present), else <c>mpiexec</c> if it is hydra; null when none.
    /// </summary>
    public static string? FindMpiexec()
    {
        if (FindOnPath("mpiexec.mpich") is { } mpich) return mpich;
        if (FindOnPath("mpiexec.hydra") is { } hydra) return hydra;
        if (FindOnPath("mpiexec") is { } plain)
        {
            var r = Run(plain, ["--version"], TimeSpan.FromSeconds(20));
            if ((r.Stdout + r.Stderr).Contains("HYDRA", StringComparison.OrdinalIgnoreCase)) return plain;
        }
        return null;
    }

    /// <summary>Searches PATH for an executable file.</summary>
    public static string? FindOnPath(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        foreach (string dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
        {
            string candidate = Path.Combine(dir, name);
            if (File.Exists(candidate)) return candidate;
        }
        return null;
    }

    /// <summary>
    /// Arguments of <c>mpiexec -n P [-f hostfile] program args...</c>. A hostfile in Open MPI form is
    /// first rewritten to hydra form (<paramref name="hydraHostfile"/>), since hydra reads only its own.
    /// </summary>
    /// <param name="ranks">Number of ranks P ≥ 1.</param>
    /// <param name="hydraHostfile">A hostfile path in hydra form, or null for the local host.</param>
    /// <param name="program">The program each rank runs.</param>
    /// <param name="programArguments">Its arguments.</param>
    public static IReadOnlyList<string> BuildArguments(int ranks, string? hydraHostfile, string program, IEnumerable<string> programArguments)
    {
        if (ranks < 1) throw new ArgumentOutOfRangeException(nameof(ranks), ranks, "-n must be at least 1.");
        ArgumentException.ThrowIfNullOrEmpty(program);
        var args = new List<string> { "-n", ranks.ToString(System.Globalization.CultureInfo.InvariantCulture) };
        if (hydraHostfile is not null) { args.Add("-f"); args.Add(hydraHostfile); }
        args.Add(program);
        args.AddRange(programArguments);
        return args;
    }

    /// <summary>Quotes a command line for printing (not for a shell to run).</summary>
    public static string Format(string file, IEnumerable<string> args) =>
        string.Join(' ', new[] { file }.Concat(args).Select(a => a.Length == 0 || a.Any(char.IsWhiteSpace) || a.Contains('"', StringComparison.Ordinal) ? $"\"{a.Replace("\"", "\\\"", StringComparison.Ordinal)}\"" : a));

    /// <summary>
    /// <see cref="Run(string, IEnumerable{string}, TimeSpan, Action{string}?, IReadOnlyDictionary{string, string?}?, CancellationToken)"/> on a worker thread, for callers that keep working (or run several jobs) meanwhile.
    /// </summary>
    /// <param name="file">Program to start.</param>
    /// <param name="args">Its arguments (passed without a shell).</param>
    /// <param name="timeout">Wall-clock limit; the whole process tree is killed at it.</param>
    /// <param name="echo">When set, each output line is also passed here as it arrives.</param>
    /// <param name="environment">Variables to set (null value: remove) on top of this process's environment.</param>
    public static Task<LaunchResult> RunAsync(string file, IEnumerable<string> args, TimeSpan timeout, Action<string>? echo = null,
        IReadOnlyDictionary<string, string?>? environment = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(file);
        ArgumentNullException.ThrowIfNull(args);
        var list = args.ToList();
        return Task.Run(() => Run(file, list, timeout, echo, environment));
    }

    /// <summary>
    /// Runs a program to completion, capturing its output; at the timeout the whole process tree is
    /// killed and <see cref="LaunchResult.TimedOut"/> is set.
    /// </summary>
    /// <param name="file">Program to start.</param>
    /// <param name="args">Its arguments (passed without a shell).</param>
    /// <param name="timeout">Wall-clock limit.</param>
    /// <param name="echo">When set, each output line is also passed here as it arrives.</param>
    /// <param name="environment">Variables to set (a null value removes the variable) on top of this
    /// process's environment.</param>
    public static LaunchResult Run(string file, IEnumerable<string> args, TimeSpan timeout, Action<string>? echo = null,
        IReadOnlyDictionary<string, string?>? environment = null) => Run(file, args, timeout, echo, environment, CancellationToken.None);

    /// <summary>
    /// As <see cref="Run(string, IEnumerable{string}, TimeSpan, Action{string}?, IReadOnlyDictionary{string, string?}?)"/>;
    /// cancelling <paramref name="kill"/> kills the whole process tree at once (a watchdog ending a hung job).
    /// </summary>
    /// <param name="file">Program to start.</param>
    /// <param name="args">Its arguments (passed without a shell).</param>
    /// <param name="timeout">Wall-clock limit.</param>
    /// <param name="echo">When set, each output line is also passed here as it arrives.</param>
    /// <param name="environment">Variables to set (a null value removes the variable).</param>
    /// <param name="kill">Kills the process tree when cancelled; the result then has the exit code of the
    /// killed launcher (non-zero).</param>
    public static LaunchResult Run(string file, IEnumerable<string> args, TimeSpan timeout, Action<string>? echo,
        IReadOnlyDictionary<string, string?>? environment, CancellationToken kill)
    {
        ArgumentException.ThrowIfNullOrEmpty(file);
        ArgumentNullException.ThrowIfNull(args);
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (string a in args) psi.ArgumentList.Add(a);
        if (environment is not null)
            foreach (var (k, v) in environment)
            {
                if (v is null) psi.Environment.Remove(k);
                else psi.Environment[k] = v;
            }
        var stdout = new StringBuilder();
        var stderr = new StringBuilder();
        var sw = Stopwatch.StartNew();
        using var p = new Process { StartInfo = psi };
        p.OutputDataReceived += (_, e) => { if (e.Data is not null) { lock (stdout) stdout.AppendLine(e.Data); echo?.Invoke(e.Data); } };
        p.ErrorDataReceived += (_, e) => { if (e.Data is not null) { lock (stderr) stderr.AppendLine(e.Data); echo?.Invoke(e.Data); } };
        p.Start();
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        bool exited;
        using (kill.Register(() =>
        {
            try { p.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
        }))
            exited = p.WaitForExit(timeout);
        if (!exited)
        {
            try { p.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
            p.WaitForExit(10_000);
        }
        else p.WaitForExit();
        string o, e2;
        lock (stdout) o = stdout.ToString();
        lock (stderr) e2 = stderr.ToString();
        return new LaunchResult(exited ? p.ExitCode : -1, o, e2, !exited, sw.Elapsed);
    }
}
