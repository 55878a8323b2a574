using System.Diagnostics;
using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Cli.Run;

/// <summary>What one rank measured for one job.</summary>
internal sealed record RankMeasurement(int Rank, int LocalTokens, double ForwardMs, double BackwardMs, double ComputeMs,
    double CommunicationMs, double BytesSentPerStep, double BytesReceivedPerStep);

/// <summary>The max relative error of one tensor against the single-device run.</summary>
internal sealed record CheckResult(string Tensor, double MaxAbsError, double MaxAbsReference, double RelativeError, bool Passed);

/// <summary>What rank 0 knows about one job when it ends.</summary>
internal sealed record JobResult(JobSpec Spec, string Layout, IReadOnlyList<RankMeasurement> Ranks, IReadOnlyList<CheckResult> Checks,
    string? CheckSkippedReason)
{
    public bool Passed => Checks.All(c => c.Passed);
}

/// <summary>
/// One job on one rank: build the local shard from deterministic inputs, run the scheme's forward (and
/// backward) <c>Iterations</c> times, gather the measurements to rank 0, and with <c>--check</c> compare
/// against a single-device run of the same kernels over the whole sequence on rank 0.
/// </summary>
internal static class RankJob
{
    /// <summary>The single-device check holds the whole sequence on rank 0; refuse above this.</summary>
    private const long CheckMemoryLimitBytes = 6L << 30;

    public static JobResult Execute(ICommunicator comm, IKernelBackend backend, Func<IKernelBackend> referenceBackendFactory,
        JobSpec spec, RunSettings s, Action<string> log)
    {
        int B = s.Batch, N = s.SeqLen, H = s.Heads, Hk = s.KvHeads, D = s.HeadDim, Dv = s.ValueDim;
        float[]? decay = spec.Attention == AttentionKind.Lightning ? RunSettings.ParseDecay(spec.DecaySpec, H) : null;
        var shape = new AttentionShape(B, N, H, Hk, D, Dv);
        var options = new SequenceParallelOptions
        {
            Attention = spec.Attention,
            Scheme = spec.Scheme,
            Causal = spec.Causal,
            Layout = s.Layout,
            Decay = decay,
            UlyssesDegree = s.UlyssesDegree,
            HybridSequenceScheme = s.HybridSequenceScheme,
        };
        using var attention = new SequenceParallelAttention(comm, backend, shape, options);
        var ranges = attention.LocalTokenRanges;
        int nloc = attention.LocalTokens;

        // Lightning has no softmax normalisation: smaller inputs keep long causal sums in a readable range.
        float amplitude = spec.Attention == AttentionKind.Lightning ? 0.25f : 1f;
        var hq = new float[(long)B * nloc * H * D];
        var hk = new float[(long)B * nloc * Hk * D];
        var hv = new float[(long)B * nloc * Hk * Dv];
        var hdo = new float[(long)B * nloc * H * Dv];
        SyntheticInputs.Fill(hq, SyntheticInputs.Query, s.Seed, B, N, H * D, ranges, amplitude);
        SyntheticInputs.Fill(hk, SyntheticInputs.Key, s.Seed, B, N, Hk * D, ranges, amplitude);
        SyntheticInputs.Fill(hv, SyntheticInputs.Values, s.Seed, B, N, Hk * Dv, ranges, 1f);
        SyntheticInputs.Fill(hdo, SyntheticInputs.OutputGradient, s.Seed, B, N, H * Dv, ranges, 1f);

        using var q = backend.Allocate(B, nloc, H, D);
        using var k = backend.Allocate(B, nloc, Hk, D);
        using var v = backend.Allocate(B, nloc, Hk, Dv);
        using var o = backend.Allocate(B, nloc, H, Dv);
        using var dO = backend.Allocate(B, nloc, H, Dv);
        using var dQ = backend.Allocate(B, nloc, H, D);
        using var dK = backend.Allocate(B, nloc, Hk, D);
        using var dV = backend.Allocate(B, nloc, Hk, Dv);
        q.CopyFromHost(hq); k.CopyFromHost(hk); v.CopyFromHost(hv); dO.CopyFromHost(hdo);

        if (comm.Rank == s.FailRank)
            throw new InvalidOperationException($"injected failure on rank {comm.Rank} (--fail-rank {s.FailRank}), while the other ranks wait in the scheme's first collective");

        comm.Barrier();
        attention.ResetTimings();
        var before = comm.Counters.Snapshot();
        double forwardMs = 0, backwardMs = 0;
        for (int it = 0; it < s.Iterations; it++)
        {
            var sw = Stopwatch.StartNew();
            attention.Forward(q, k, v, o);
            backend.Synchronize();
            forwardMs += sw.Elapsed.TotalMilliseconds;
            if (s.Backward)
            {
                sw.Restart();
                attention.Backward(dO, dQ, dK, dV);
                backend.Synchronize();
                backwardMs += sw.Elapsed.TotalMilliseconds;
            }
        }
        var after = comm.Counters.Snapshot();
        double sent = 0, received = 0;
        foreach (var (op, c) in after)
        {
            before.TryGetValue(op, out var b0);
            sent += c.BytesSent - b0.BytesSent;
            received += c.BytesReceived - b0.BytesReceived;
        }
        var timings = attention.Timings;
        int iters = s.Iterations;
        var mine = new RankMeasurement(comm.Rank, nloc, forwardMs / iters, backwardMs / iters, timings.ComputeMs / iters,
            timings.CommunicationMs / iters, sent / iters, received / iters);
        var all = GatherMeasurements(comm, mine);

        var checks = new List<CheckResult>();
        string? skipped = null;
        string layout = ranges.Count > 1 ? "zigzag" : "contiguous";
        if (s.Check)
        {
            long refBytes = 4L * B * N * (3L * H * D + 3L * Hk * D + 3L * H * Dv + 3L * Hk * Dv);
            if (refBytes > CheckMemoryLimitBytes || N >= (1 << 24))
                skipped = $"the single-device run would need {refBytes / (1 << 20)} MiB on rank 0 (limit {CheckMemoryLimitBytes >> 20} MiB)";
            else
                checks = RunCheck(comm, referenceBackendFactory, spec, s, decay, ranges, o, dQ, dK, dV, log);
        }
        return new JobResult(spec, layout, all, checks, skipped);
    }

    private static List<RankMeasurement> GatherMeasurements(ICommunicator comm, RankMeasurement m)
    {
        const int Width = 8;
        ReadOnlySpan<float> mine =
        [
            m.Rank, m.LocalTokens, (float)m.ForwardMs, (float)m.BackwardMs, (float)m.ComputeMs, (float)m.CommunicationMs,
            (float)(m.BytesSentPerStep / 1024.0), (float)(m.BytesReceivedPerStep / 1024.0),
        ];
        var all = new float[Width * comm.Size];
        comm.AllGather(mine, all);
        var list = new List<RankMeasurement>(comm.Size);
        for (int r = 0; r < comm.Size; r++)
        {
            var x = all.AsSpan(r * Width, Width);
            list.Add(new RankMeasurement((int)x[0], (int)x[1], x[2], x[3], x[4], x[5], x[6] * 1024.0, x[7] * 1024.0));
        }
        return list;
    }

    /// <summary>
    /// Gathers the distributed outputs (and gradients) to every rank in global token order, runs the
    /// same kernels over the whole sequence on rank 0, and agrees on the verdict on all ranks.
    /// </summary>
    private static List<CheckResult> RunCheck(ICommunicator comm, Func<IKernelBackend> referenceBackendFactory, JobSpec spec,
        RunSettings s, float[]? decay, IReadOnlyList<(int Start, int Count)> ranges, DeviceTensor o, DeviceTensor dQ,
        DeviceTensor dK, DeviceTensor dV, Action<string> log)
    {
        int B = s.Batch, N = s.SeqLen, H = s.Heads, Hk = s.KvHeads, D = s.HeadDim, Dv = s.ValueDim;
        var allRanges = GatherRanges(comm, ranges);
        float[]? gO = GatherGlobal(comm, o, B, N, H * Dv, allRanges);
        float[]? gdQ = null, gdK = null, gdV = null;
        if (s.Backward)
        {
            gdQ = GatherGlobal(comm, dQ, B, N, H * D, allRanges);
            gdK = GatherGlobal(comm, dK, B, N, Hk * D, allRanges);
            gdV = GatherGlobal(comm, dV, B, N, Hk * Dv, allRanges);
        }

        var results = new List<CheckResult>();
        var verdict = new float[1];
        if (comm.Rank == 0)
        {
            log($"check: single-device {spec.Attention.ToString().ToLowerInvariant()} over all {N} tokens on rank 0");
            using var rb = referenceBackendFactory();
            var full = new[] { (0, N) };
            var hq = new float[(long)B * N * H * D]; var hk = new float[(long)B * N * Hk * D];
            var hv = new float[(long)B * N * Hk * Dv]; var hdo = new float[(long)B * N * H * Dv];
            float amplitude = spec.Attention == AttentionKind.Lightning ? 0.25f : 1f;
            SyntheticInputs.Fill(hq, SyntheticInputs.Query, s.Seed, B, N, H * D, full, amplitude);
            SyntheticInputs.Fill(hk, SyntheticInputs.Key, s.Seed, B, N, Hk * D, full, amplitude);
            SyntheticInputs.Fill(hv, SyntheticInputs.Values, s.Seed, B, N, Hk * Dv, full, 1f);
            SyntheticInputs.Fill(hdo, SyntheticInputs.OutputGradient, s.Seed, B, N, H * Dv, full, 1f);
            using var q = rb.Allocate(B, N, H, D); using var k = rb.Allocate(B, N, Hk, D); using var v = rb.Allocate(B, N, Hk, Dv);
            using var ro = rb.Allocate(B, N, H, Dv); using var rdo = rb.Allocate(B, N, H, Dv);
            q.CopyFromHost(hq); k.CopyFromHost(hk); v.CopyFromHost(hv); rdo.CopyFromHost(hdo);
            hq = hk = hv = hdo = null!;
            using var rdq = rb.Allocate(B, N, H, D); using var rdk = rb.Allocate(B, N, Hk, D); using var rdv = rb.Allocate(B, N, Hk, Dv);
            if (spec.Attention == AttentionKind.Softmax)
            {
                using var lse = rb.Allocate(B, H, N);
                var fo = new FlashOptions(0, 0, spec.Causal);
                rb.FlashForward(q, k, v, ro, lse, fo);
                if (s.Backward)
                {
                    using var drow = rb.Allocate(B, H, N);
                    rb.SoftmaxRowDot(ro, rdo, drow);
                    rb.FlashBackward(q, k, v, lse, drow, rdo, rdq, rdk, rdv, fo);
                }
            }
            else
            {
                float[] lambda = decay ?? Enumerable.Repeat(1f, H).ToArray();
                rb.LightningForward(q, k, v, lambda, spec.Causal, null, ro, null);
                if (s.Backward) rb.LightningBackward(q, k, v, lambda, spec.Causal, null, rdo, null, rdq, rdk, rdv, null);
            }
            rb.Synchronize();
            results.Add(Compare("O", gO!, ro, s.Tolerance));
            if (s.Backward)
            {
                results.Add(Compare("dQ", gdQ!, rdq, s.Tolerance));
                results.Add(Compare("dK", gdK!, rdk, s.Tolerance));
                results.Add(Compare("dV", gdV!, rdv, s.Tolerance));
            }
            verdict[0] = results.All(r => r.Passed) ? 0f : 1f;
        }
        // Every rank learns the verdict, so every rank exits with the same code.
        comm.AllReduceSum(verdict, verdict);
        if (comm.Rank != 0 && verdict[0] != 0f)
            results.Add(new CheckResult("(rank 0 verdict)", double.NaN, double.NaN, double.NaN, false));
        return results;
    }

    private static CheckResult Compare(string name, float[] distributed, DeviceTensor reference, double tolerance)
    {
        var r = new float[reference.Length];
        reference.CopyToHost(r);
        double maxErr = 0, maxRef = 0;
        bool finite = true;
        for (long i = 0; i < r.Length; i++)
        {
            double a = distributed[i], b = r[i];
            if (!double.IsFinite(a)) finite = false;
            maxErr = Math.Max(maxErr, Math.Abs(a - b));
            maxRef = Math.Max(maxRef, Math.Abs(b));
        }
        double rel = maxErr / Math.Max(maxRef, 1e-12);
        return new CheckResult(name, maxErr, maxRef, finite ? rel : double.NaN, finite && rel <= tolerance);
    }

    private static List<(int Start, int Count)>[] GatherRanges(ICommunicator comm, IReadOnlyList<(int Start, int Count)> ranges)
    {
        const int MaxRanges = 4;
        if (ranges.Count > MaxRanges) throw new NotSupportedException($"--check supports at most {MaxRanges} token ranges per rank.");
        var mine = new float[1 + 2 * MaxRanges];
        mine[0] = ranges.Count;
        for (int i = 0; i < ranges.Count; i++) { mine[1 + 2 * i] = ranges[i].Start; mine[2 + 2 * i] = ranges[i].Count; }
        var all = new float[mine.Length * comm.Size];
        comm.AllGather(mine, all);
        var result = new List<(int, int)>[comm.Size];
        for (int r = 0; r < comm.Size; r++)
        {
            int off = r * mine.Length;
            result[r] = [];
            for (int i = 0; i < (int)all[off]; i++) result[r].Add(((int)all[off + 1 + 2 * i], (int)all[off + 2 + 2 * i]));
        }
        return result;
    }

    /// <summary>All-gathers a local <c>[B, Nloc, rowWidth]</c> tensor; rank 0 gets it in global token order.</summary>
    private static float[]? GatherGlobal(ICommunicator comm, DeviceTensor local, int batch, int seqLen, int rowWidth,
        List<(int Start, int Count)>[] allRanges)
    {
        var mine = new float[local.Length];
        local.CopyToHost(mine);
        var counts = new int[comm.Size];
        long total = 0;
        for (int r = 0; r < comm.Size; r++)
        {
            long c = (long)batch * allRanges[r].Sum(x => x.Count) * rowWidth;
            if (c > int.MaxValue) throw new NotSupportedException("--check: a shard is too large to gather; lower --seq.");
            counts[r] = (int)c;
            total += c;
        }
        var gathered = new float[total];
        comm.AllGatherVariable(mine, gathered, counts);
        if (comm.Rank != 0) return null;
        var global = new float[(long)batch * seqLen * rowWidth];
        long offset = 0;
        for (int r = 0; r < comm.Size; r++)
        {
            Sharding.PutLocal(gathered.AsSpan((int)offset, counts[r]), global, batch, seqLen, rowWidth, allRanges[r]);
            offset += counts[r];
        }
        return global;
    }
}
