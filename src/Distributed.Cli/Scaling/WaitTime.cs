namespace Distributed.Cli.Scaling;

/// <summary>
/// Time each rank spent blocked for a slower peer, from every rank's <see cref="CommEvent"/>s on one clock
/// (Stopwatch ticks: one process in-process, and the system's monotonic clock for MPI ranks on one host).
/// For a collective, the peers are the other members entering the same numbered collective of the group; for a
/// point-to-point exchange, the peer is the rank received from, entering its matching exchange (the j-th one
/// sent to this rank). The wait of one call is <c>clamp(last peer's entry − this rank's block start, 0, blocked time)</c>:
/// the part of the blocking that passed before the data could even have been offered.
/// </summary>
internal static class WaitTime
{
    /// <summary>Milliseconds of waiting per world rank and phase (<c>[rank][phase]</c>, phases 0 and 1).</summary>
    public static double[][] PerRankAndPhase(IReadOnlyList<CommEvent>[] events)
    {
        int p = events.Length;
        var collectiveEntry = new Dictionary<(int Group, int Index), List<(int Rank, long Enter)>>();
        var sends = new Dictionary<(int Group, int From, int To), List<long>>();
        for (int r = 0; r < p; r++)
            foreach (var e in events[r])
            {
                if (e.Index >= 0)
                {
                    if (!collectiveEntry.TryGetValue((e.Group, e.Index), out var list)) collectiveEntry[(e.Group, e.Index)] = list = [];
                    list.Add((r, e.Enter));
                }
                else
                {
                    if (!sends.TryGetValue((e.Group, r, e.Destination), out var list)) sends[(e.Group, r, e.Destination)] = list = [];
                    list.Add(e.Enter);
                }
            }
        var result = Enumerable.Range(0, p).Select(_ => new double[2]).ToArray();
        for (int r = 0; r < p; r++)
        {
            var received = new Dictionary<(int Group, int From), int>();
            foreach (var e in events[r])
            {
                long peerEntry;
                if (e.Index >= 0)
                {
                    var others = collectiveEntry[(e.Group, e.Index)].Where(x => x.Rank != r).ToList();
                    if (others.Count == 0) continue;
                    peerEntry = others.Max(x => x.Enter);
                }
                else
                {
                    int j = received.GetValueOrDefault((e.Group, e.Source));
                    received[(e.Group, e.Source)] = j + 1;
                    if (!sends.TryGetValue((e.Group, e.Source, r), out var list) || j >= list.Count) continue;
                    peerEntry = list[j];
                }
                if (e.Phase is < 0 or > 1) continue;
                long blocked = e.BlockEnd - e.BlockStart;
                long wait = Math.Clamp(peerEntry - e.BlockStart, 0, Math.Max(0, blocked));
                result[r][e.Phase] += wait * 1000.0 / System.Diagnostics.Stopwatch.Frequency;
            }
        }
        return result;
    }
}
