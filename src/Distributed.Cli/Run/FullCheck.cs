using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Cli.Run;

/// <summary>
/// <c>--check full</c>: gathers the distributed outputs (and gradients) to rank 0 in global token order,
/// reruns the same kernels over the whole sequence on one device there, and agrees on the verdict on all
/// ranks. It catches errors of the parallel schemes but not of the kernels (both sides run them), and
/// rank 0 holds the whole sequence; <see cref="SampledCheck"/> is the independent, cheap check.
/// </summary>
internal static class FullCheck
{
    public static List<CheckResult> Run(ICommunicator comm, Func<IKernelBackend> referenceBackendFactory, JobSpec spec,
        AttentionShape shape, float[]? decay, RunSettings s, RunInputs inputs, IReadOnlyList<(int Start, int Count)> ranges,
        DeviceTensor o, DeviceTensor? dQ, DeviceTensor? dK, DeviceTensor? dV, Action<string> log)
    {
        int B = shape.Batch, N = shape.SeqLen, H = shape.Heads, Hk = shape.KvHeads, D = shape.HeadDim, Dv = shape.ValueDim;
        var allRanges = RankRanges.Gather(comm, ranges);
        float[]? gO = GatherGlobal(comm, o, B, N, H * Dv, allRanges);
        float[]? gdQ = null, gdK = null, gdV = null;
        if (s.Backward)
        {
            gdQ = GatherGlobal(comm, dQ!, B, N, H * D, allRanges);
            gdK = GatherGlobal(comm, dK!, B, N, Hk * D, allRanges);
            gdV = GatherGlobal(comm, dV!, B, N, Hk * Dv, allRanges);
        }

        var results = new List<CheckResult>();
        var verdict = new float[1];
        if (comm.Rank == 0)
        {
            log($"check: single-device {spec.Attention.ToString().ToLowerInvariant()} over all {N} tokens on rank 0");
            using var rb = referenceBackendFactory();
            IReadOnlyList<(int, int)> full = [(0, N)];
            var streams = new TensorStreams();
            using var q = rb.Allocate(B, N, H, D); using var k = rb.Allocate(B, N, Hk, D); using var v = rb.Allocate(B, N, Hk, Dv);
            using var ro = rb.Allocate(B, N, H, Dv);
            streams.Load(inputs.Q, full, q); streams.Load(inputs.K, full, k); streams.Load(inputs.V, full, v);
            using var rdo = s.Backward ? rb.Allocate(B, N, H, Dv) : null;
            using var rdq = s.Backward ? rb.Allocate(B, N, H, D) : null;
            using var rdk = s.Backward ? rb.Allocate(B, N, Hk, D) : null;
            using var rdv = s.Backward ? rb.Allocate(B, N, Hk, Dv) : null;
            if (rdo is not null) streams.Load(inputs.DOut!, full, rdo);
            if (spec.Attention == AttentionKind.Softmax)
            {
                using var lse = rb.Allocate(B, H, N);
                var fo = new FlashOptions(0, 0, spec.Causal);
                rb.FlashForward(q, k, v, ro, lse, fo);
                if (s.Backward)
                {
                    using var drow = rb.Allocate(B, H, N);
                    rb.SoftmaxRowDot(ro, rdo!, drow);
                    rb.FlashBackward(q, k, v, lse, drow, rdo!, rdq!, rdk!, rdv!, fo);
                }
            }
            else
            {
                float[] lambda = decay ?? Enumerable.Repeat(1f, H).ToArray();
                rb.LightningForward(q, k, v, lambda, spec.Causal, null, ro, null);
                if (s.Backward) rb.LightningBackward(q, k, v, lambda, spec.Causal, null, rdo!, null, rdq!, rdk!, rdv!, null);
            }
            rb.Synchronize();
            results.Add(Compare("O", gO!, ro, s.Tolerance));
            if (s.Backward)
            {
                results.Add(Compare("dQ", gdQ!, rdq!, s.Tolerance));
                results.Add(Compare("dK", gdK!, rdk!, s.Tolerance));
                results.Add(Compare("dV", gdV!, rdv!, s.Tolerance));
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
        long nonFinite = 0;
        for (long i = 0; i < r.Length; i++)
        {
            double a = distributed[i], b = r[i];
            if (!double.IsFinite(a)) { nonFinite++; continue; }
            maxErr = Math.Max(maxErr, Math.Abs(a - b));
            maxRef = Math.Max(maxRef, Math.Abs(b));
        }
        double rel = maxErr / Math.Max(maxRef, 1e-30);
        bool passed = nonFinite == 0 && r.Length > 0 && rel <= tolerance;
        return new CheckResult(name, maxErr, maxRef, nonFinite == 0 ? rel : double.NaN, passed, r.Length, nonFinite);
    }

    /// <summary>All-gathers a local <c>[B, Nloc, rowWidth]</c> tensor; rank 0 gets it in global token order.</summary>
    private static float[]? GatherGlobal(ICommunicator comm, DeviceTensor local, int batch, int seqLen, int rowWidth,
        IReadOnlyList<(int Start, int Count)>[] allRanges)
    {
        var mine = new float[local.Length];
        local.CopyToHost(mine);
        var counts = new int[comm.Size];
        long total = 0;
        for (int r = 0; r < comm.Size; r++)
        {
            long c = (long)batch * allRanges[r].Sum(x => x.Count) * rowWidth;
            if (c > int.MaxValue) throw new NotSupportedException("--check full: a shard is too large to gather; use --check (sampled).");
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
