using Distributed.Cli.Check;
using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Cli.Run;

/// <summary>
/// <c>--check</c> (sampled): every rank verifies its own rows against an fp64 reference computed directly
/// from the inputs, not with the project's kernels (<see cref="SoftmaxSampledReference"/>,
/// <see cref="LightningSampledReference"/>). Rows: the first and last token of each of the rank's ranges
/// (batch 0 and B−1) plus <c>--check-rows</c> random ones, all heads. O, LSE and dQ at the sampled query rows;
/// dK and dV at the same tokens as key rows (softmax: from the inputs and the run's own LSE and Drow of every
/// row, which are gathered; LSE is itself checked on the sampled rows). The per-tensor errors are merged over
/// ranks, so every rank reaches the same verdict. Cost: one pass over the inputs per sampled batch, not O(N²).
/// </summary>
internal static class SampledCheck
{
    public static List<CheckResult> Run(ICommunicator comm, JobSpec spec, AttentionShape shape, float[]? decay, RunSettings s,
        RunInputs inputs, IReadOnlyList<(int Start, int Count)> ranges, DeviceTensor o, DeviceTensor? lse, DeviceTensor? dO,
        DeviceTensor? dQ, DeviceTensor? dK, DeviceTensor? dV, Action<string> log)
    {
        int B = shape.Batch, H = shape.Heads, Hk = shape.KvHeads, D = shape.HeadDim, Dv = shape.ValueDim;
        long N = shape.SeqLen;
        int nloc = ranges.Sum(r => r.Count);
        var dims = new SampledDims(B, N, H, Hk, D, Dv);
        var rows = SampledRows.Choose(ranges, B, s.Seed * 0x9E3779B97F4A7C15UL + (ulong)comm.Rank + 1, s.CheckRows);
        var tokens = rows.Select(r => r.Row).ToList();
        bool softmax = spec.Attention == AttentionKind.Softmax;
        float[] lambda = decay ?? [];
        log($"check: fp64 reference from the inputs on {rows.Count} sampled rows per rank (all heads)");

        var query = softmax
            ? SoftmaxSampledReference.QueryRows(inputs.Q, inputs.K, inputs.V, inputs.DOut, dims, spec.Causal, 0, tokens)
            : LightningSampledReference.QueryRows(inputs.Q, inputs.K, inputs.V, inputs.DOut, dims, lambda, spec.Causal, tokens);
        var cO = new CheckComparison("O");
        var cLse = new CheckComparison("LSE");
        var cdQ = new CheckComparison("dQ");
        var cdK = new CheckComparison("dK");
        var cdV = new CheckComparison("dV");
        var buffer = new float[Math.Max(H, Hk) * Math.Max(D, Dv)];
        for (int r = 0; r < rows.Count; r++)
        {
            long row = rows[r].LocalRowIndex(nloc);
            cO.Add(Row(o, row, H * Dv, buffer), query.ORow(r));
            if (softmax && lse is not null)
                for (int h = 0; h < H; h++)
                {
                    lse.CopyToHost(buffer.AsSpan(0, 1), ((long)rows[r].Batch * H + h) * nloc + rows[r].LocalToken);
                    cLse.Add(buffer.AsSpan(0, 1), query.Lse.AsSpan(r * H + h, 1));
                }
            if (dQ is not null) cdQ.Add(Row(dQ, row, H * D, buffer), query.DQRow(r));
        }
        if (dK is not null && dV is not null && dO is not null)
        {
            KeyRowResults keys;
            if (softmax)
            {
                var (gLse, gDrow) = GatherRowStatistics(comm, shape, ranges, lse!, o, dO);
                keys = SoftmaxSampledReference.KeyRows(inputs.Q, inputs.DOut!, inputs.K, inputs.V, new ArrayRowValues(gLse, B, H, N),
                    new ArrayRowValues(gDrow, B, H, N), dims, spec.Causal, 0, tokens);
            }
            else
                keys = LightningSampledReference.KeyRows(inputs.Q, inputs.K, inputs.V, inputs.DOut!, dims, lambda, spec.Causal, tokens);
            for (int r = 0; r < rows.Count; r++)
            {
                long row = rows[r].LocalRowIndex(nloc);
                cdK.Add(Row(dK, row, Hk * D, buffer), keys.DKRow(r));
                cdV.Add(Row(dV, row, Hk * Dv, buffer), keys.DVRow(r));
            }
        }
        var mine = new List<CheckComparison> { cO };
        if (softmax && lse is not null) mine.Add(cLse);
        if (dQ is not null) mine.AddRange([cdQ, cdK, cdV]);
        return Merge(comm, mine, s.Tolerance);
    }

    private static ReadOnlySpan<float> Row(DeviceTensor t, long row, int width, float[] buffer)
    {
        var span = buffer.AsSpan(0, width);
        t.CopyToHost(span, row * width);
        return span;
    }

    /// <summary>
    /// The run's LSE and Drow = rowsum(dO ∘ O) of every query row, <c>[B, H, N]</c> on every rank: each rank
    /// computes Drow of its rows on the host in fp64 from its O and dO, and one all-gather brings both.
    /// </summary>
    private static (float[] Lse, float[] Drow) GatherRowStatistics(ICommunicator comm, AttentionShape shape,
        IReadOnlyList<(int Start, int Count)> ranges, DeviceTensor lse, DeviceTensor o, DeviceTensor dO)
    {
        int B = shape.Batch, H = shape.Heads, Dv = shape.ValueDim, N = shape.SeqLen;
        int nloc = ranges.Sum(r => r.Count);
        long block = (long)B * H * nloc;
        var send = new float[2 * block];
        lse.CopyToHost(send.AsSpan(0, (int)block));
        var oRow = new float[H * Dv];
        var dORow = new float[H * Dv];
        for (int b = 0; b < B; b++)
            for (int t = 0; t < nloc; t++)
            {
                long at = ((long)b * nloc + t) * H * Dv;
                o.CopyToHost(oRow, at);
                dO.CopyToHost(dORow, at);
                for (int h = 0; h < H; h++)
                {
                    double sum = 0;
                    for (int e = 0; e < Dv; e++) sum += (double)oRow[h * Dv + e] * dORow[h * Dv + e];
                    send[block + ((long)b * H + h) * nloc + t] = (float)sum;
                }
            }
        var all = RankRanges.Gather(comm, ranges);
        var counts = all.Select(rs => checked(2 * B * H * rs.Sum(x => x.Count))).ToArray();
        var gathered = new float[counts.Sum(c => (long)c)];
        comm.AllGatherVariable(send, gathered, counts);
        var gLse = new float[(long)B * H * N];
        var gDrow = new float[(long)B * H * N];
        long offset = 0;
        for (int r = 0; r < comm.Size; r++)
        {
            int tokens = all[r].Sum(x => x.Count);
            int half = B * H * tokens;
            Sharding.PutLocal(gathered.AsSpan((int)offset, half), gLse, B * H, N, 1, all[r]);
            Sharding.PutLocal(gathered.AsSpan((int)offset + half, half), gDrow, B * H, N, 1, all[r]);
            offset += counts[r];
        }
        return (gLse, gDrow);
    }

    /// <summary>Collective: merges each tensor's comparison over the ranks (max errors, summed counts).</summary>
    private static List<CheckResult> Merge(ICommunicator comm, List<CheckComparison> mine, double tolerance)
    {
        const int Width = 8;
        static (float, float) Split(long x) => (x >> 24, x & 0xFFFFFF);
        var send = new float[Width * mine.Count];
        for (int i = 0; i < mine.Count; i++)
        {
            var c = mine[i];
            var (eh, el) = Split(c.Elements);
            var (nh, nl) = Split(c.NonFinite);
            var (rh, rl) = Split(c.NonFiniteReference);
            float[] v = [(float)c.MaxAbsError, (float)c.MaxAbsReference, eh, el, nh, nl, rh, rl];
            v.CopyTo(send, Width * i);
        }
        var all = new float[send.Length * comm.Size];
        comm.AllGather(send, all);
        var results = new List<CheckResult>();
        for (int i = 0; i < mine.Count; i++)
        {
            double maxErr = 0, maxRef = 0;
            long elements = 0, nonFinite = 0, nonFiniteRef = 0;
            for (int r = 0; r < comm.Size; r++)
            {
                var x = all.AsSpan(r * send.Length + Width * i, Width);
                // NaN must win the max: a NaN error makes the check fail.
                maxErr = double.IsNaN(x[0]) || double.IsNaN(maxErr) ? double.NaN : Math.Max(maxErr, x[0]);
                maxRef = Math.Max(maxRef, x[1]);
                elements += ((long)x[2] << 24) + (long)x[3];
                nonFinite += ((long)x[4] << 24) + (long)x[5];
                nonFiniteRef += ((long)x[6] << 24) + (long)x[7];
            }
            double rel = maxErr / Math.Max(maxRef, CheckComparison.DefaultTiny);
            bool passed = elements > 0 && nonFinite == 0 && nonFiniteRef == 0 && rel <= tolerance;
            results.Add(new CheckResult(mine[i].Tensor, maxErr, maxRef, elements > 0 && nonFinite == 0 ? rel : double.NaN, passed, elements, nonFinite));
        }
        return results;
    }
}
