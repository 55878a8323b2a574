using System.Diagnostics;
using System.Globalization;

namespace Distributed.Cluster.ControlPlane;

/// <summary>
/// Testing only, active when the environment variable <c>DSATTN_FAULT</c> is set: <c>hang:R:K</c> makes
/// rank R sleep forever when it enters its K-th collective (counted from 1 over every collective call,
/// barriers and splits included); <c>exit:R:K</c> makes it kill itself there (SIGKILL, no clean-up).
/// Several faults may be given, separated by commas.
/// </summary>
public static class FaultInjection
{
    private static readonly (bool Hang, int Rank, long At)[] Faults = Parse(Environment.GetEnvironmentVariable("DSATTN_FAULT"));

    /// <summary>Parses a DSATTN_FAULT value; an empty or null one means no fault.</summary>
    /// <exception cref="ArgumentException">The value is not hang:R:K or exit:R:K.</exception>
    internal static (bool Hang, int Rank, long At)[] Parse(string? spec)
    {
        if (string.IsNullOrWhiteSpace(spec)) return [];
        var list = new List<(bool, int, long)>();
        foreach (string part in spec.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            string[] f = part.Split(':');
            if (f.Length != 3 || (f[0] != "hang" && f[0] != "exit")
                || !int.TryParse(f[1], NumberStyles.None, CultureInfo.InvariantCulture, out int rank)
                || !long.TryParse(f[2], NumberStyles.None, CultureInfo.InvariantCulture, out long at) || at < 1)
                throw new ArgumentException($"DSATTN_FAULT: '{part}' is not hang:R:K or exit:R:K (rank R ≥ 0, collective K ≥ 1).", nameof(spec));
            list.Add((f[0] == "hang", rank, at));
        }
        return [.. list];
    }

    /// <summary>Called by the communicators as world rank <paramref name="worldRank"/> enters its
    /// <paramref name="count"/>-th collective.</summary>
    internal static void OnEnter(int worldRank, long count)
    {
        foreach (var (hang, rank, at) in Faults)
        {
            if (rank != worldRank || at != count) continue;
            Console.Error.WriteLine($"rank {worldRank}: DSATTN_FAULT {(hang ? "hang" : "exit")} at collective #{count}");
            Console.Error.Flush();
            if (hang) Thread.Sleep(Timeout.Infinite);
            Process.GetCurrentProcess().Kill();
            Thread.Sleep(Timeout.Infinite);
        }
    }
}
