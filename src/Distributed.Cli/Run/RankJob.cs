using System.Diagnostics;
using Distributed.Cli.Check;
using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Cli.Run;

/// <summary>What one rank measured for one job. <see cref="AllocatedBytesPerStep"/>: managed bytes allocated per step
/// after the first (NaN with one step); for in-process ranks the process's total divided by the ranks.</summary>
internal sealed record RankMeasurement(int Rank, long LocalTokens, double ForwardMs, double BackwardMs, double ComputeMs,
    double CommunicationMs, double BytesSentPerStep, double BytesReceivedPerStep, double PeakBytes,
    double LinkCommunicationMs = 0, double LinkWaitedMs = 0, double AllocatedBytesPerStep = double.NaN)
{
    /// <summary>With an emulated link: the share of the communication time not waited for (hidden behind compute).</summary>
    public double HiddenFraction => LinkCommunicationMs > 0 ? Math.Clamp((LinkCommunicationMs - LinkWaitedMs) / LinkCommunicationMs, 0, 1) : 0;

    /// <summary>GFLOP/s of this rank: its share (1/P) of the job's FLOPs over its forward + backward time.</summary>
    public double Gflops(double jobFlops, int ranks) => ForwardMs + BackwardMs > 0 ? jobFlops / ranks / ((ForwardMs + BackwardMs) * 1e6) : 0;
}

/// <summary>The max relative error of one tensor against the reference, over <see cref="Compared"/> elements.</summary>
internal sealed record CheckResult(string Tensor, double MaxAbsError, double MaxAbsReference, double RelativeError, bool Passed,
    long Compared = 0, long NonFinite = 0);

/// <summary>What rank 0 knows about one job when it ends.</summary>
internal sealed record JobResult(JobSpec Spec, AttentionShape Shape, string Layout, IReadOnlyList<RankMeasurement> Ranks,
    IReadOnlyList<CheckResult> Checks, CheckMode CheckMode, string? CheckSkippedReason, double Flops, long TotalMs)
{
    /// <summary>Under --check: one line per rank and output tensor holding NaN or ±Inf (the whole tensor is scanned).</summary>
    public IReadOnlyList<string> NonFiniteOutputs { get; init; } = [];

    /// <summary>Set when the job refused to run (--check-finite found NaN/Inf in an input): the reason, printed once.</summary>
    public string? Refusal { get; init; }

    public bool Passed => Refusal is null && NonFiniteOutputs.Count == 0 && Checks.All(c => c.Passed);
}

/// <summary>
/// One job on one rank: load its shard of the inputs (synthetic or .npy, only its own rows), run the
/// scheme's forward (and backward) <c>Iterations</c> times, write its rows of the outputs, gather the
/// measurements to every rank, and with <c>--check</c> verify the result.
/// </summary>
internal static class RankJob
{
    /// <summary>The single-device check holds the whole sequence on rank 0; refuse above this.</summary>
    private const long FullCheckMemoryLimitBytes = 6L << 30;

    public static JobResult Execute(ICommunicator comm, IKernelBackend backend, Func<IKernelBackend> referenceBackendFactory,
        JobSpec spec, AttentionShape shape, RunSettings s, RunOutputs? outputs, RunProgress progress, Action<string> log)
    {
        var total = Stopwatch.StartNew();
        int B = shape.Batch, N = shape.SeqLen, H = shape.Heads, Hk = shape.KvHeads, D = shape.HeadDim, Dv = shape.ValueDim;
        float[]? decay = spec.Attention == AttentionKind.Lightning ? RunSettings.ParseDecay(spec.DecaySpec, H) : null;
        // With --link-bandwidth the scheme talks through the emulated link; everything else uses the real one.
        using var link = s.Link is null ? null : new EmulatedLinkCommunicator(comm, s.Link);
        using var attention = new SequenceParallelAttention((ICommunicator?)link ?? comm, backend, shape, Options(spec, s));
        var ranges = attention.LocalTokenRanges;
        int nloc = attention.LocalTokens;
        using var inputs = RunInputs.Open(s, spec, shape);

        double loadTotal = (double)B * nloc * (H * D + Hk * D + Hk * Dv + (s.Backward ? H * Dv : 0));
        progress.Phase("load inputs", loadTotal);
        var streams = new TensorStreams { Moved = n => progress.Advance(n) };
        using var q = backend.Allocate(B, nloc, H, D);
        using var k = backend.Allocate(B, nloc, Hk, D);
        using var v = backend.Allocate(B, nloc, Hk, Dv);
        using var o = backend.Allocate(B, nloc, H, Dv);
        streams.Load(inputs.Q, ranges, q);
        streams.Load(inputs.K, ranges, k);
        streams.Load(inputs.V, ranges, v);
        // Backward tensors exist only when asked for: a forward-only run holds four tensors, not eight.
        using var dO = s.Backward ? backend.Allocate(B, nloc, H, Dv) : null;
        using var dQ = s.Backward ? backend.Allocate(B, nloc, H, D) : null;
        using var dK = s.Backward ? backend.Allocate(B, nloc, Hk, D) : null;
        using var dV = s.Backward ? backend.Allocate(B, nloc, Hk, Dv) : null;
        if (dO is not null) streams.Load(inputs.DOut!, ranges, dO);

        if (s.CheckFinite)
        {
            // Collective: every rank learns every rank's findings, so all stop together (no rank waits in a collective).
            var bad = FiniteScan.Gather(comm, [.. InputTensors(shape, s.Backward)],
                [FiniteScan.Scan(q, ranges, N), FiniteScan.Scan(k, ranges, N), FiniteScan.Scan(v, ranges, N), .. dO is null ? Array.Empty<FiniteScan.Finding>() : [FiniteScan.Scan(dO, ranges, N)]]);
            if (bad.Count > 0)
                return new JobResult(spec, shape, ranges.Count > 1 ? "zigzag" : "contiguous", [], [], s.Check, null, 0, total.ElapsedMilliseconds)
                {
                    Refusal = $"--check-finite: the inputs hold NaN or Inf, so nothing was computed or written:\n  {string.Join("\n  ", bad)}\nFix the input data (or drop --check-finite to run anyway).",
                };
        }

        if (comm.Rank == s.FailRank && s.FailAt == "start")
            throw new InvalidOperationException($"injected failure on rank {comm.Rank} (--fail-rank {s.FailRank}), while the other ranks wait in the scheme's first collective");

        // One step: forward (and backward), each timed to its device's completion.
        (double Forward, double Backward) Step()
        {
            var sw = Stopwatch.StartNew();
            attention.Forward(q, k, v, o);
            backend.Synchronize();
            double forward = sw.Elapsed.TotalMilliseconds;
            progress.Advance(1);
            if (!s.Backward) return (forward, 0);
            sw.Restart();
            attention.Backward(dO!, dQ!, dK!, dV!);
            backend.Synchronize();
            progress.Advance(2.5);
            return (forward, sw.Elapsed.TotalMilliseconds);
        }

        if (s.Warmup > 0)
        {
            progress.Phase($"{s.Warmup} warm-up step(s)", s.Warmup * (s.Backward ? 3.5 : 1));
            for (int w = 0; w < s.Warmup; w++) Step();
        }
        comm.Barrier();
        attention.ResetTimings();
        link?.Statistics.Reset();
        var before = comm.Counters.Snapshot();
        double forwardMs = 0, backwardMs = 0;
        // Without --warmup the first timed step is the warm-up (JIT, pools, scratch) for the allocation figure:
        // what the steps after it allocate is the steady state.
        bool warmed = s.Warmup > 0;
        int allocatedSteps = warmed ? s.Iterations : s.Iterations - 1;
        long allocatedMark = warmed ? AllocatedBytesMark(comm) : 0;
        progress.Phase(s.Iterations > 1 ? $"{s.Iterations} steps" : s.Backward ? "forward + backward" : "forward", s.Iterations * (s.Backward ? 3.5 : 1));
        for (int it = 0; it < s.Iterations; it++)
        {
            if (!warmed && it == 1) allocatedMark = AllocatedBytesMark(comm);
            var (forward, backward) = Step();
            forwardMs += forward;
            backwardMs += backward;
        }
        // In-process ranks share the process's counter: its growth over the steps is divided among them.
        double allocatedPerStep = allocatedSteps > 0
            ? (AllocatedBytesMark(comm) - allocatedMark) / (double)(comm is InProcessCommunicator ? comm.Size : 1) / allocatedSteps
            : double.NaN;
        var after = comm.Counters.Snapshot();
        double linkCommMs = link?.Statistics.CommunicationMs ?? 0, linkWaitedMs = link?.Statistics.WaitedMs ?? 0;
        double sent = 0, received = 0;
        foreach (var (op, c) in after)
        {
            before.TryGetValue(op, out var b0);
            sent += c.BytesSent - b0.BytesSent;
            received += c.BytesReceived - b0.BytesReceived;
        }

        // The LSE of softmax runs: written with --lse, and the sampled check verifies it and uses it for dK, dV.
        using var lse = spec.Attention == AttentionKind.Softmax && (outputs?.Wants("LSE") == true || s.Check == CheckMode.Sampled)
            ? backend.Allocate(B, H, nloc) : null;
        if (lse is not null) attention.CopyLse(lse);

        if (outputs is not null)
        {
            long outputFloats = (long)B * nloc * (H * Dv + (lse is not null && outputs.Wants("LSE") ? H : 0) + (s.Backward ? H * D + Hk * D + Hk * Dv : 0));
            progress.Phase("write outputs", outputFloats);
            outputs.Write(streams, "O", o, ranges, B, N, H * Dv);
            if (comm.Rank == s.FailRank && s.FailAt == "write")
                throw new InvalidOperationException($"injected failure on rank {comm.Rank} (--fail-rank {s.FailRank} --fail-at write), after writing part of its outputs");
            if (lse is not null) outputs.Write(streams, "LSE", lse, ranges, (long)B * H, N, 1);
            if (s.Backward)
            {
                outputs.Write(streams, "dQ", dQ!, ranges, B, N, H * D);
                outputs.Write(streams, "dK", dK!, ranges, B, N, Hk * D);
                outputs.Write(streams, "dV", dV!, ranges, B, N, Hk * Dv);
            }
        }

        // The sampled check compares a few rows; a NaN or Inf anywhere in an output is found by scanning it whole.
        IReadOnlyList<string> nonFinite = [];
        if (s.Check != CheckMode.None)
        {
            var names = new List<(string, long[])> { ("O", [B, N, H, Dv]) };
            var found = new List<FiniteScan.Finding> { FiniteScan.Scan(o, ranges, N) };
            if (lse is not null) { names.Add(("LSE", [B, H, N])); found.Add(FiniteScan.Scan(lse, ranges, N, lse: true)); }
            if (s.Backward)
            {
                names.AddRange([("dQ", [B, N, H, D]), ("dK", [B, N, Hk, D]), ("dV", [B, N, Hk, Dv])]);
                found.AddRange([FiniteScan.Scan(dQ!, ranges, N), FiniteScan.Scan(dK!, ranges, N), FiniteScan.Scan(dV!, ranges, N)]);
            }
            nonFinite = FiniteScan.Gather(comm, names, found);
        }

        var timings = attention.Timings;
        int iters = s.Iterations;
        var mine = new RankMeasurement(comm.Rank, nloc, forwardMs / iters, backwardMs / iters, timings.ComputeMs / iters,
            timings.CommunicationMs / iters, sent / iters, received / iters, PeakMemory.ProcessPeakBytes(), linkCommMs / iters, linkWaitedMs / iters, allocatedPerStep);
        var all = GatherMeasurements(comm, mine);
        // In-process ranks read one shared counter a few bytes apart; every rank reports rank 0's reading.
        if (comm is InProcessCommunicator) all = [.. all.Select(m => m with { AllocatedBytesPerStep = all[0].AllocatedBytesPerStep })];

        var checks = new List<CheckResult>();
        string? skipped = null;
        string layout = ranges.Count > 1 ? "zigzag" : "contiguous";
        if (s.Check == CheckMode.Sampled)
        {
            progress.Phase("check (sampled rows, fp64)", 1);
            checks = SampledCheck.Run(comm, spec, shape, decay, s, inputs, ranges, o, lse, dO, dQ, dK, dV, log);
        }
        else if (s.Check == CheckMode.Full)
        {
            long refBytes = 4L * B * N * (3L * H * D + 3L * Hk * D + 3L * H * Dv + 3L * Hk * Dv);
            if (refBytes > FullCheckMemoryLimitBytes)
                skipped = $"the single-device run would need {refBytes / (1 << 20)} MiB on rank 0 (limit {FullCheckMemoryLimitBytes >> 20} MiB); use --check (sampled)";
            else
            {
                progress.Phase("check (single-device rerun)", 1);
                checks = FullCheck.Run(comm, referenceBackendFactory, spec, shape, decay, s, inputs, ranges, o, dQ, dK, dV, log);
            }
        }
        progress.Phase("", 1);
        return new JobResult(spec, shape, layout, all, checks, s.Check, skipped, JobFlops(spec, shape, s.Backward), total.ElapsedMilliseconds)
        {
            NonFiniteOutputs = nonFinite,
        };
    }

    /// <summary>The input tensors of a job with their global shapes, in load order.</summary>
    private static IEnumerable<(string, long[])> InputTensors(AttentionShape x, bool backward)
    {
        yield return ("Q", [x.Batch, x.SeqLen, x.Heads, x.HeadDim]);
        yield return ("K", [x.Batch, x.SeqLen, x.KvHeads, x.HeadDim]);
        yield return ("V", [x.Batch, x.SeqLen, x.KvHeads, x.ValueDim]);
        if (backward) yield return ("dO", [x.Batch, x.SeqLen, x.Heads, x.ValueDim]);
    }

    /// <summary>The library options of a job.</summary>
    public static SequenceParallelOptions Options(JobSpec spec, RunSettings s) => new()
    {
        Attention = spec.Attention,
        Scheme = spec.Scheme,
        Causal = spec.Causal,
        Layout = s.Layout,
        Decay = spec.Attention == AttentionKind.Lightning ? RunSettings.ParseDecay(spec.DecaySpec, s.Heads) : null,
        UlyssesDegree = s.UlyssesDegree,
        HybridSequenceScheme = s.HybridSequenceScheme,
        Overlap = s.Overlap,
    };

    /// <summary>
    /// FLOPs of one step of the whole job (all ranks). Softmax forward: 2·B·H·N²·(D+Dv) (half when causal);
    /// lightning forward: 2·B·H·N·(C·(D+Dv)/2 + 2·D·Dv) causal with C = 64 the block, 4·B·H·N·D·Dv
    /// non-causal. Backward counted as 2.5× the forward (softmax) and 2× (lightning), as in <c>bench kernels</c>.
    /// </summary>
    public static double JobFlops(JobSpec spec, AttentionShape s, bool backward)
    {
        double b = s.Batch, h = s.Heads, n = s.SeqLen, d = s.HeadDim, dv = s.ValueDim;
        double forward = spec.Attention == AttentionKind.Softmax
            ? 2 * b * h * n * n * (d + dv) * (spec.Causal ? 0.5 : 1)
            : spec.Causal ? 2 * b * h * n * (64 * (d + dv) / 2 + 2 * d * dv) : 4 * b * h * n * d * dv;
        double backwardFactor = spec.Attention == AttentionKind.Softmax ? 2.5 : 2;
        return forward * (backward ? 1 + backwardFactor : 1);
    }

    /// <summary>
    /// The runtime's count of managed bytes allocated so far (<see cref="GC.GetTotalAllocatedBytes(bool)"/>, precise),
    /// read between two barriers: in-process ranks share one counter, and no rank is mid-step while any reads it.
    /// </summary>
    private static long AllocatedBytesMark(ICommunicator comm)
    {
        comm.Barrier();
        long bytes = GC.GetTotalAllocatedBytes(precise: true);
        comm.Barrier();
        return bytes;
    }

    private static List<RankMeasurement> GatherMeasurements(ICommunicator comm, RankMeasurement m)
    {
        // Floats carry 24 bits exactly: large values travel as (high, low) halves.
        const int Width = 15;
        static (float, float) Split(double x) { double hi = Math.Floor(x / 65536.0); return ((float)hi, (float)(x - hi * 65536.0)); }
        var (tokHi, tokLo) = Split(m.LocalTokens);
        var (peakHi, peakLo) = Split(Math.Round(m.PeakBytes / 1024.0));
        // NaN (one step, nothing measured) travels as NaN halves.
        var (allocHi, allocLo) = Split(Math.Round(m.AllocatedBytesPerStep));
        ReadOnlySpan<float> mine =
        [
            m.Rank, tokHi, tokLo, (float)m.ForwardMs, (float)m.BackwardMs, (float)m.ComputeMs, (float)m.CommunicationMs,
            (float)(m.BytesSentPerStep / 1024.0), (float)(m.BytesReceivedPerStep / 1024.0), peakHi, peakLo,
            (float)m.LinkCommunicationMs, (float)m.LinkWaitedMs, allocHi, allocLo,
        ];
        var all = new float[Width * comm.Size];
        comm.AllGather(mine, all);
        var list = new List<RankMeasurement>(comm.Size);
        for (int r = 0; r < comm.Size; r++)
        {
            var x = all.AsSpan(r * Width, Width);
            list.Add(new RankMeasurement((int)x[0], (long)(x[1] * 65536.0 + x[2]), x[3], x[4], x[5], x[6], x[7] * 1024.0, x[8] * 1024.0,
                (x[9] * 65536.0 + x[10]) * 1024.0, x[11], x[12], x[13] * 65536.0 + x[14]));
        }
        return list;
    }
}
