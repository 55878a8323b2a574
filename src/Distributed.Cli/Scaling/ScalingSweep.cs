using System.Diagnostics;
using Distributed.Cli.Run;
using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Cli.Scaling;

/// <summary>What to sweep: schemes × P × N for each attention kind, on one shape.</summary>
internal sealed record ScalingPlan
{
    public required IReadOnlyList<(AttentionKind Kind, ParallelScheme Scheme)> Schemes { get; init; }
    public required IReadOnlyList<int> Ranks { get; init; }
    public required IReadOnlyList<int> LightningSeqs { get; init; }
    public required IReadOnlyList<int> SoftmaxSeqs { get; init; }
    public int Batch { get; init; } = 1;
    public int Heads { get; init; } = 8;
    public int KvHeads { get; init; } = 8;
    public int HeadDim { get; init; } = 64;
    public int ValueDim { get; init; } = 64;
    public int Iterations { get; init; } = 2;
    public string Backend { get; init; } = "auto";

    public IReadOnlyList<int> Seqs(AttentionKind kind) => kind == AttentionKind.Lightning ? LightningSeqs : SoftmaxSeqs;

    public AttentionShape Shape(int n) => new(Batch, n, Heads, KvHeads, HeadDim, ValueDim);
}

/// <summary>One phase (forward or backward) of one rank: wall, kernel, collective and waiting time, and bytes.</summary>
internal sealed record PhaseFigures(double WallMs, double ComputeMs, double CommMs, double WaitMs, double BytesSent, double BytesReceived);

/// <summary>One rank's figures of a case (the best of the measured steps).</summary>
internal sealed record RankFigures(int Rank, double Tokens, PhaseFigures Forward, PhaseFigures Backward, double PeakBytes);

/// <summary>One measured case: a scheme at (P, N), causal, forward and backward.</summary>
internal sealed record CaseResult(AttentionKind Attention, ParallelScheme Scheme, int Ranks, AttentionShape Shape, string Layout, IReadOnlyList<RankFigures> PerRank, double Flops)
{
    /// <summary>The step: the slowest rank's forward + backward wall time.</summary>
    public double StepMs => PerRank.Max(r => r.Forward.WallMs + r.Backward.WallMs);

    public string SchemeName => Scheme.ToString().ToLowerInvariant();

    public string AttentionName => Attention.ToString().ToLowerInvariant();
}

/// <summary>
/// Runs a <see cref="ScalingPlan"/> on the ranks of a world communicator (in-process or MPI). For each P the
/// world is split once: ranks below P run the cases on their own communicator, the others wait politely; a case's
/// Ps run back to back. Each case:
/// one warm-up step, then <see cref="ScalingPlan.Iterations"/> measured steps; per step and rank, the phase
/// clock's compute and communication time, the waiting time (<see cref="WaitTime"/>), the bytes from the
/// counters and the peak resident memory; the step whose slowest rank was fastest is kept.
/// </summary>
internal static class ScalingSweep
{
    /// <summary>Runs the sweep, then measures the link between ranks 0 and 1 (<see cref="LinkProbe"/>); returns the
    /// results on world rank 0 (empty elsewhere), the skipped cases with why, and the link.</summary>
    public static (List<CaseResult> Results, List<string> Skipped, (double AlphaSeconds, double BytesPerSecond) Link) Run(ICommunicator world, ScalingPlan plan, int cpuThreads, Action<string, int, int>? progress)
    {
        var results = new List<CaseResult>();
        var skipped = new List<string>();
        using var backend = KernelBackends.Create(plan.Backend, 0, cpuThreads);
        var ranks = plan.Ranks.Where(p => p <= world.Size).Distinct().Order().ToList();
        int total = ranks.Sum(p => plan.Schemes.Sum(s => plan.Seqs(s.Kind).Count)), done = 0;
        // One communicator per P, made up front, so that the Ps of a case run back to back: on a shared
        // machine the load drifts over minutes, and a case's P = 1, 2, 4 should see the same load.
        var groups = ranks.ToDictionary(p => p, p => world.Split(world.Rank < p ? 0 : 1, world.Rank));
        try
        {
            foreach (var (kind, scheme) in plan.Schemes)
                foreach (int n in plan.Seqs(kind))
                    foreach (int p in ranks)
                    {
                        if (world.Rank < p)
                        {
                            progress?.Invoke($"{kind.ToString().ToLowerInvariant()} {scheme.ToString().ToLowerInvariant()} P={p} N={n}", done, total);
                            var shape = plan.Shape(n);
                            var options = Options(kind, scheme);
                            string? refusal = null;
                            try { SequenceParallelAttention.CheckFits(shape, options, p, p, checkHostMemory: false); }
                            catch (ArgumentException e) { refusal = e.Message; }
                            if (refusal is null && scheme is ParallelScheme.Ulysses && plan.Heads % p != 0) refusal = $"H % P == 0 needed (H = {plan.Heads})";
                            if (refusal is not null)
                            {
                                if (world.Rank == 0) skipped.Add($"{kind.ToString().ToLowerInvariant()} {scheme.ToString().ToLowerInvariant()} P={p} N={n}: {refusal}");
                            }
                            else if (Measure(groups[p], backend, kind, scheme, shape, options, plan.Iterations) is { } r)
                                results.Add(r);
                        }
                        done++;
                        // Idle ranks wait here without spinning (a started collective's Wait gives the core away).
                        world.StartAllGather(new float[1], new float[world.Size]).Wait();
                    }
        }
        finally
        {
            foreach (var g in groups.Values) g.Dispose();
        }
        progress?.Invoke("link probe", total, total);
        var link = LinkProbe.Measure(world);
        return (results, skipped, link);
    }

    internal static SequenceParallelOptions Options(AttentionKind kind, ParallelScheme scheme) => new()
    {
        Attention = kind,
        Scheme = scheme,
        Causal = true,
    };

    private static CaseResult? Measure(ICommunicator comm, IKernelBackend backend, AttentionKind kind, ParallelScheme scheme, AttentionShape s, SequenceParallelOptions options, int iterations)
    {
        var log = new CommEventLog();
        var timed = new TimedCommunicator(comm, log);
        var decayed = kind == AttentionKind.Lightning ? options with { Decay = SequenceParallelAttention.DefaultDecay(s.Heads) } : options;
        using var attention = new SequenceParallelAttention(timed, backend, s, decayed);
        int nl = attention.LocalTokens;
        var rnd = new Random(17 + comm.Rank);
        DeviceTensor Fill(float amplitude, params int[] shape)
        {
            var t = backend.Allocate(shape);
            var host = new float[t.Length];
            for (int i = 0; i < host.Length; i++) host[i] = (float)(rnd.NextDouble() * 2 - 1) * amplitude;
            t.CopyFromHost(host);
            return t;
        }
        float kvAmp = kind == AttentionKind.Lightning ? 0.25f : 1f;
        using var q = Fill(1, s.Batch, nl, s.Heads, s.HeadDim);
        using var k = Fill(kvAmp, s.Batch, nl, s.KvHeads, s.HeadDim);
        using var v = Fill(1, s.Batch, nl, s.KvHeads, s.ValueDim);
        using var dO = Fill(1, s.Batch, nl, s.Heads, s.ValueDim);
        using var o = backend.Allocate(s.Batch, nl, s.Heads, s.ValueDim);
        using var dQ = backend.Allocate(s.Batch, nl, s.Heads, s.HeadDim);
        using var dK = backend.Allocate(s.Batch, nl, s.KvHeads, s.HeadDim);
        using var dV = backend.Allocate(s.Batch, nl, s.KvHeads, s.ValueDim);
        attention.Forward(q, k, v, o);
        attention.Backward(dO, dQ, dK, dV);
        CaseResult? best = null;
        for (int it = 0; it < iterations; it++)
        {
            log.Clear();
            comm.Barrier();
            var forward = Phase(0, () => attention.Forward(q, k, v, o));
            var backward = Phase(1, () => attention.Backward(dO, dQ, dK, dV));
            log.Phase = -1;
            var all = GatherFigures(comm, forward, backward, nl, PeakMemory.ProcessPeakBytes(), log.Events);
            if (all is null) continue;
            string layout = attention.LocalTokenRanges.Count > 1 ? "zigzag" : "contiguous";
            var result = new CaseResult(kind, scheme, comm.Size, s, layout, all, RankJob.JobFlops(new JobSpec(kind, scheme, true, "auto"), s, backward: true));
            if (best is null || result.StepMs < best.StepMs) best = result;
        }
        return best;

        PhaseFigures Phase(int phase, Action work)
        {
            log.Phase = phase;
            var before = comm.Counters.Snapshot();
            attention.ResetTimings();
            var sw = Stopwatch.StartNew();
            work();
            backend.Synchronize();
            double wall = sw.Elapsed.TotalMilliseconds;
            var t = attention.Timings;
            var after = comm.Counters.Snapshot();
            double sent = 0, received = 0;
            foreach (var (op, c) in after)
            {
                before.TryGetValue(op, out var b0);
                sent += c.BytesSent - b0.BytesSent;
                received += c.BytesReceived - b0.BytesReceived;
            }
            return new PhaseFigures(wall, t.ComputeMs, t.CommunicationMs, 0, sent, received);
        }
    }

    /// <summary>Every rank's figures and events to every rank; rank 0 returns them with the waits filled in.</summary>
    private static List<RankFigures>? GatherFigures(ICommunicator comm, PhaseFigures f, PhaseFigures b, int tokens, long peak, IReadOnlyList<CommEvent> events)
    {
        // Doubles travel as (high, low) float pairs; ticks and ints travel as exact 16-bit pieces.
        double[] values = [f.WallMs, f.ComputeMs, f.CommMs, f.BytesSent, f.BytesReceived, b.WallMs, b.ComputeMs, b.CommMs, b.BytesSent, b.BytesReceived, tokens, peak];
        var mine = new List<float>();
        foreach (double x in values) { float hi = (float)x; mine.Add(hi); mine.Add((float)(x - hi)); }
        foreach (var e in events)
            foreach (long x in new long[] { e.Group, e.Index, e.Destination, e.Source, e.Phase, e.Enter, e.BlockStart, e.BlockEnd })
                for (int shift = 48; shift >= 0; shift -= 16) mine.Add((x >> shift) & 0xffff);
        var counts = new float[comm.Size];
        comm.AllGather([mine.Count], counts);
        var sizes = counts.Select(c => (int)c).ToArray();
        var all = new float[sizes.Sum()];
        comm.AllGatherVariable(mine.ToArray(), all, sizes);
        if (comm.Rank != 0) return null;
        const int EventFloats = 8 * 4;
        var perRank = new List<(double[] Values, List<CommEvent> Events)>();
        int offset = 0;
        for (int r = 0; r < comm.Size; r++)
        {
            var span = all.AsSpan(offset, sizes[r]);
            var v = new double[values.Length];
            for (int i = 0; i < v.Length; i++) v[i] = (double)span[2 * i] + span[2 * i + 1];
            var list = new List<CommEvent>();
            for (int at = 2 * values.Length; at + EventFloats <= span.Length; at += EventFloats)
            {
                var x = new long[8];
                for (int j = 0; j < 8; j++)
                {
                    long value = 0;
                    for (int piece = 0; piece < 4; piece++) value = (value << 16) | (long)span[at + 4 * j + piece];
                    x[j] = value;
                }
                list.Add(new CommEvent((int)x[0], (int)x[1], (int)x[2], (int)x[3], (int)x[4], x[5], x[6], x[7]));
            }
            perRank.Add((v, list));
            offset += sizes[r];
        }
        var waits = WaitTime.PerRankAndPhase(perRank.Select(p => (IReadOnlyList<CommEvent>)p.Events).ToArray());
        return perRank.Select((p, r) =>
        {
            var v = p.Values;
            return new RankFigures(r, v[10], new PhaseFigures(v[0], v[1], v[2], waits[r][0], v[3], v[4]), new PhaseFigures(v[5], v[6], v[7], waits[r][1], v[8], v[9]), v[11]);
        }).ToList();
    }
}
