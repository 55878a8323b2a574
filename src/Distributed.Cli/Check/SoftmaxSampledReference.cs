using static Distributed.Cli.Check.VectorMath;

namespace Distributed.Cli.Check;

/// <summary>
/// An independent fp64 reference for softmax attention at sampled rows only, computed straight from the
/// inputs (no kernel of the project): its cost is O(N·rows·H·(D + Dv)) time and O(block + rows) memory, so
/// it stays usable at millions of tokens. Positions are global; causal: query i sees key j iff j ≤ i.
/// </summary>
internal static class SoftmaxSampledReference
{
    /// <summary>Tokens read per block of a streamed tensor.</summary>
    public const int DefaultBlockTokens = 512;

    /// <summary>
    /// Exact O_i <c>[H·Dv]</c> and LSE_i <c>[H]</c> (natural log of Σ_j exp(scale·q_i·k_j) over visible keys) of the
    /// sampled query rows, and with <paramref name="dO"/> also Drow_i = dO_i·O_i <c>[H]</c> and
    /// dQ_i = scale·Σ_j P_ij (dO_i·v_j − Drow_i) k_j <c>[H·D]</c>, P_ij = exp(scale·q_i·k_j − LSE_i).
    /// One streaming pass over K and V per batch (up to the last sampled token when causal) serves all its rows,
    /// with an online max; dQ is Σ P·dP·k − Drow·Σ P·k, both sums kept alongside O.
    /// </summary>
    /// <param name="scale">Softmax scale; 0 or less (or NaN) means 1/sqrt(D).</param>
    public static QueryRowResults QueryRows(ITokenRows q, ITokenRows k, ITokenRows v, ITokenRows? dO, SampledDims dims,
        bool causal, double scale, IReadOnlyList<TokenRow> rows, int blockTokens = DefaultBlockTokens)
    {
        dims.ExpectInputs(q, k, v, dO, blockTokens);
        int H = dims.Heads, Hk = dims.KvHeads, D = dims.HeadDim, Dv = dims.ValueDim, group = dims.Group;
        double sc = dims.ScaleOrDefault(scale);
        bool grad = dO is not null;

        int R = rows.Count;
        var o = new double[(long)R * H * Dv];
        var lse = new double[(long)R * H];
        var drow = grad ? new double[(long)R * H] : null;
        var dq = grad ? new double[(long)R * H * D] : null;

        foreach (var (b, order) in TokenRow.GroupByBatch(rows, dims))
        {
            int n = order.Length;
            long[] tokens = order.Select(r => rows[r].Token).ToArray();
            var qs = TokenRowsAccess.ReadRows(q, b, tokens);
            var dos = grad ? TokenRowsAccess.ReadRows(dO!, b, tokens) : null;
            // Per (row, head): running max m, Σ e^(s−m), Σ e^(s−m) v, and for dQ Σ e^(s−m) k and Σ e^(s−m)(dO·v) k.
            var max = new double[n * H];
            Array.Fill(max, double.NegativeInfinity);
            var sum = new double[n * H];
            var acc = new double[(long)n * H * Dv];
            var kSum = grad ? new double[(long)n * H * D] : null;
            var cSum = grad ? new double[(long)n * H * D] : null;

            long end = causal ? tokens[^1] + 1 : dims.SeqLen;
            var kf = new float[blockTokens * Hk * D];
            var vf = new float[blockTokens * Hk * Dv];
            var kd = new double[blockTokens * Hk * D];
            var vd = new double[blockTokens * Hk * Dv];
            for (long start = 0; start < end; start += blockTokens)
            {
                int cnt = (int)Math.Min(blockTokens, end - start);
                k.Read(b, start, cnt, kf);
                v.Read(b, start, cnt, vf);
                Widen(kf.AsSpan(0, cnt * Hk * D), kd);
                Widen(vf.AsSpan(0, cnt * Hk * Dv), vd);
                long blockStart = start;
                Parallel.For(0, n, r =>
                {
                    int visible = causal ? (int)Math.Clamp(tokens[r] - blockStart + 1, 0, cnt) : cnt;
                    if (visible == 0) return;
                    var s = new double[visible];
                    for (int h = 0; h < H; h++)
                    {
                        int g = h / group, rh = r * H + h;
                        var qh = qs.AsSpan((r * H + h) * D, D);
                        double blockMax = double.NegativeInfinity;
                        for (int j = 0; j < visible; j++)
                        {
                            s[j] = sc * Dot(qh, kd.AsSpan((j * Hk + g) * D, D));
                            blockMax = Math.Max(blockMax, s[j]);
                        }
                        double m = Math.Max(max[rh], blockMax);
                        if (m > max[rh] && !double.IsNegativeInfinity(max[rh]))
                        {
                            double alpha = Math.Exp(max[rh] - m);
                            sum[rh] *= alpha;
                            Scale(alpha, acc.AsSpan(rh * Dv, Dv));
                            if (grad)
                            {
                                Scale(alpha, kSum.AsSpan(rh * D, D));
                                Scale(alpha, cSum.AsSpan(rh * D, D));
                            }
                        }
                        max[rh] = m;
                        var accRow = acc.AsSpan(rh * Dv, Dv);
                        var doh = grad ? dos.AsSpan(rh * Dv, Dv) : default;
                        for (int j = 0; j < visible; j++)
                        {
                            double p = Math.Exp(s[j] - m);
                            sum[rh] += p;
                            var vj = vd.AsSpan((j * Hk + g) * Dv, Dv);
                            Axpy(p, vj, accRow);
                            if (!grad) continue;
                            var kj = kd.AsSpan((j * Hk + g) * D, D);
                            Axpy(p, kj, kSum.AsSpan(rh * D, D));
                            Axpy(p * Dot(doh, vj), kj, cSum.AsSpan(rh * D, D));
                        }
                    }
                });
            }

            for (int r = 0; r < n; r++)
            {
                int outRow = order[r];
                for (int h = 0; h < H; h++)
                {
                    int rh = r * H + h;
                    lse[outRow * H + h] = max[rh] + Math.Log(sum[rh]);
                    var oh = o.AsSpan((outRow * H + h) * Dv, Dv);
                    Axpy(1.0 / sum[rh], acc.AsSpan(rh * Dv, Dv), oh);
                    if (!grad) continue;
                    double dr = Dot(dos.AsSpan(rh * Dv, Dv), oh);
                    drow![outRow * H + h] = dr;
                    // dQ = scale·(Σ P·dP·k − Drow·Σ P·k), with P = e^(s−m)/Σ.
                    var dqh = dq.AsSpan((outRow * H + h) * D, D);
                    Axpy(sc / sum[rh], cSum.AsSpan(rh * D, D), dqh);
                    Axpy(-sc * dr / sum[rh], kSum.AsSpan(rh * D, D), dqh);
                }
            }
        }
        return new QueryRowResults(rows, H, D, Dv, o, lse, drow, dq);
    }

    /// <summary>
    /// Exact dV_j = Σ_{h∈group} Σ_i P_ij dO_i <c>[Hk·Dv]</c> and dK_j = scale·Σ_{h∈group} Σ_i P_ij (dO_i·v_j − Drow_i) q_i
    /// <c>[Hk·D]</c> of the sampled key rows, over every query row i (causal: i ≥ j), with
    /// P_ij = exp(scale·q_i·k_j − LSE_i). LSE and Drow <c>[B, H, N]</c> are the whole attention's row statistics
    /// (from the run being checked: exact row statistics cost a full O(N²) pass). Rows with LSE = −inf add nothing.
    /// One streaming pass over Q, dO, LSE and Drow per batch (from the first sampled token when causal).
    /// </summary>
    /// <param name="scale">Softmax scale; 0 or less (or NaN) means 1/sqrt(D).</param>
    public static KeyRowResults KeyRows(ITokenRows q, ITokenRows dO, ITokenRows k, ITokenRows v, IRowValues lse, IRowValues drow,
        SampledDims dims, bool causal, double scale, IReadOnlyList<TokenRow> rows, int blockTokens = DefaultBlockTokens)
    {
        dims.ExpectInputs(q, k, v, dO, blockTokens);
        int H = dims.Heads, Hk = dims.KvHeads, D = dims.HeadDim, Dv = dims.ValueDim, group = dims.Group;
        dims.Expect(lse, nameof(lse));
        dims.Expect(drow, nameof(drow));
        double sc = dims.ScaleOrDefault(scale);

        int R = rows.Count;
        var dk = new double[(long)R * Hk * D];
        var dv = new double[(long)R * Hk * Dv];
        foreach (var (b, order) in TokenRow.GroupByBatch(rows, dims))
        {
            int n = order.Length;
            long[] tokens = order.Select(r => rows[r].Token).ToArray();
            var ks = TokenRowsAccess.ReadRows(k, b, tokens);
            var vs = TokenRowsAccess.ReadRows(v, b, tokens);
            var dkAcc = new double[(long)n * Hk * D];
            var dvAcc = new double[(long)n * Hk * Dv];

            long first = causal ? tokens[0] : 0;
            var qf = new float[blockTokens * H * D];
            var of = new float[blockTokens * H * Dv];
            var qd = new double[blockTokens * H * D];
            var od = new double[blockTokens * H * Dv];
            var lseBlock = new double[H * blockTokens];
            var drowBlock = new double[H * blockTokens];
            for (long start = first; start < dims.SeqLen; start += blockTokens)
            {
                int cnt = (int)Math.Min(blockTokens, dims.SeqLen - start);
                q.Read(b, start, cnt, qf);
                dO.Read(b, start, cnt, of);
                Widen(qf.AsSpan(0, cnt * H * D), qd);
                Widen(of.AsSpan(0, cnt * H * Dv), od);
                for (int h = 0; h < H; h++)
                {
                    lse.Read(b, h, start, cnt, lseBlock.AsSpan(h * blockTokens, cnt));
                    drow.Read(b, h, start, cnt, drowBlock.AsSpan(h * blockTokens, cnt));
                }
                long blockStart = start;
                Parallel.For(0, n, r =>
                {
                    // Causal: query rows i ≥ j only.
                    int from = causal ? (int)Math.Clamp(tokens[r] - blockStart, 0, cnt) : 0;
                    for (int g = 0; g < Hk; g++)
                    {
                        var kj = ks.AsSpan((r * Hk + g) * D, D);
                        var vj = vs.AsSpan((r * Hk + g) * Dv, Dv);
                        var dkj = dkAcc.AsSpan((r * Hk + g) * D, D);
                        var dvj = dvAcc.AsSpan((r * Hk + g) * Dv, Dv);
                        for (int h = g * group; h < (g + 1) * group; h++)
                            for (int i = from; i < cnt; i++)
                            {
                                double l = lseBlock[h * blockTokens + i];
                                if (double.IsNegativeInfinity(l)) continue;
                                var qi = qd.AsSpan((i * H + h) * D, D);
                                var doi = od.AsSpan((i * H + h) * Dv, Dv);
                                double p = Math.Exp(sc * Dot(qi, kj) - l);
                                Axpy(p, doi, dvj);
                                Axpy(sc * p * (Dot(doi, vj) - drowBlock[h * blockTokens + i]), qi, dkj);
                            }
                    }
                });
            }
            for (int r = 0; r < n; r++)
            {
                dkAcc.AsSpan(r * Hk * D, Hk * D).CopyTo(dk.AsSpan(order[r] * Hk * D));
                dvAcc.AsSpan(r * Hk * Dv, Hk * Dv).CopyTo(dv.AsSpan(order[r] * Hk * Dv));
            }
        }
        return new KeyRowResults(rows, Hk, D, Dv, dk, dv);
    }
}
