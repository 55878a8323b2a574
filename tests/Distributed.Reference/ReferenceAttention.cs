namespace Distributed.Reference;

/// <summary>
/// The one fp64 reference for every block operation: naive, obviously correct, O(N²) memory and time.
/// Layouts as in IKernelBackend: Q [B,Nq,H,D], K [B,Nk,Hk,D], V [B,Nk,Hk,Dv], O [B,Nq,H,Dv],
/// LSE [B,H,Nq], states [B,H,D,Dv]. Query head h reads KV head h / (H/Hk). Positions are global:
/// query i sees key j iff kOffset + j ≤ qOffset + i (when causal).
/// </summary>
public static class ReferenceAttention
{
    /// <summary>Problem sizes.</summary>
    public readonly record struct Dims(int B, int Nq, int Nk, int H, int Hk, int D, int Dv)
    {
        /// <summary>Query heads per KV head.</summary>
        public int Group => H / Hk;

        /// <summary>Index of Q[b,i,h,d].</summary>
        public long Q(int b, int i, int h, int d) => (((long)b * Nq + i) * H + h) * D + d;

        /// <summary>Index of K[b,j,g,d].</summary>
        public long K(int b, int j, int g, int d) => (((long)b * Nk + j) * Hk + g) * D + d;

        /// <summary>Index of V[b,j,g,e].</summary>
        public long V(int b, int j, int g, int e) => (((long)b * Nk + j) * Hk + g) * Dv + e;

        /// <summary>Index of O[b,i,h,e].</summary>
        public long O(int b, int i, int h, int e) => (((long)b * Nq + i) * H + h) * Dv + e;

        /// <summary>Index of LSE[b,h,i].</summary>
        public long L(int b, int h, int i) => ((long)b * H + h) * Nq + i;

        /// <summary>Index of S[b,h,d,e].</summary>
        public long S(int b, int h, int d, int e) => (((long)b * H + h) * D + d) * Dv + e;
    }

    private static bool Visible(bool causal, long qOffset, long kOffset, int i, int j) => !causal || kOffset + j <= qOffset + i;

    /// <summary>Softmax attention: O and LSE (natural log of Σ exp(scale·q·k)); rows seeing no key get O = 0, LSE = -inf.</summary>
    public static (double[] O, double[] Lse) FlashForward(double[] q, double[] k, double[] v, Dims x, long qOffset, long kOffset, bool causal, double scale)
    {
        var o = new double[(long)x.B * x.Nq * x.H * x.Dv];
        var lse = new double[(long)x.B * x.H * x.Nq];
        var s = new double[x.Nk];
        for (int b = 0; b < x.B; b++)
            for (int h = 0; h < x.H; h++)
            {
                int g = h / x.Group;
                for (int i = 0; i < x.Nq; i++)
                {
                    double max = double.NegativeInfinity;
                    for (int j = 0; j < x.Nk; j++)
                    {
                        if (!Visible(causal, qOffset, kOffset, i, j)) { s[j] = double.NegativeInfinity; continue; }
                        double dot = 0;
                        for (int d = 0; d < x.D; d++) dot += q[x.Q(b, i, h, d)] * k[x.K(b, j, g, d)];
                        s[j] = dot * scale;
                        max = Math.Max(max, s[j]);
                    }
                    if (double.IsNegativeInfinity(max)) { lse[x.L(b, h, i)] = double.NegativeInfinity; continue; }
                    double sum = 0;
                    for (int j = 0; j < x.Nk; j++) sum += double.IsNegativeInfinity(s[j]) ? 0 : Math.Exp(s[j] - max);
                    for (int j = 0; j < x.Nk; j++)
                    {
                        if (double.IsNegativeInfinity(s[j])) continue;
                        double p = Math.Exp(s[j] - max) / sum;
                        for (int e = 0; e < x.Dv; e++) o[x.O(b, i, h, e)] += p * v[x.V(b, j, g, e)];
                    }
                    lse[x.L(b, h, i)] = max + Math.Log(sum);
                }
            }
        return (o, lse);
    }

    /// <summary>
    /// Gradients of Σ O∘dO through full softmax attention over the given keys, from the definition:
    /// P = softmax(scale·QKᵀ), dP = dO Vᵀ, dS = P ∘ (dP − rowsum(dO∘O)), dQ = scale·dS K, dK = scale·dSᵀ Q, dV = Pᵀ dO.
    /// </summary>
    public static (double[] dQ, double[] dK, double[] dV) FlashBackward(double[] q, double[] k, double[] v, double[] dO, Dims x,
        long qOffset, long kOffset, bool causal, double scale)
    {
        var (o, lse) = FlashForward(q, k, v, x, qOffset, kOffset, causal, scale);
        var dq = new double[q.Length];
        var dk = new double[k.Length];
        var dv = new double[v.Length];
        for (int b = 0; b < x.B; b++)
            for (int h = 0; h < x.H; h++)
            {
                int g = h / x.Group;
                for (int i = 0; i < x.Nq; i++)
                {
                    double l = lse[x.L(b, h, i)];
                    if (double.IsNegativeInfinity(l)) continue;
                    double drow = 0;
                    for (int e = 0; e < x.Dv; e++) drow += dO[x.O(b, i, h, e)] * o[x.O(b, i, h, e)];
                    for (int j = 0; j < x.Nk; j++)
                    {
                        if (!Visible(causal, qOffset, kOffset, i, j)) continue;
                        double dot = 0;
                        for (int d = 0; d < x.D; d++) dot += q[x.Q(b, i, h, d)] * k[x.K(b, j, g, d)];
                        double p = Math.Exp(dot * scale - l);
                        double dp = 0;
                        for (int e = 0; e < x.Dv; e++)
                        {
                            dp += dO[x.O(b, i, h, e)] * v[x.V(b, j, g, e)];
                            dv[x.V(b, j, g, e)] += p * dO[x.O(b, i, h, e)];
                        }
                        double ds = p * (dp - drow) * scale;
                        for (int d = 0; d < x.D; d++)
                        {
                            dq[x.Q(b, i, h, d)] += ds * k[x.K(b, j, g, d)];
                            dk[x.K(b, j, g, d)] += ds * q[x.Q(b, i, h, d)];
                        }
                    }
                }
            }
        return (dq, dk, dv);
    }

    /// <summary>
    /// The softmax backward over one K/V block given the row statistics of the <b>whole</b> attention
    /// (LSE [B,H,Nq] and Drow = rowsum(dO∘O) [B,H,Nq]), as a kernel on a KV shard receives them:
    /// P = exp(scale·q·k − LSE), dS = P∘(dO·v − Drow). Rows with LSE = -inf contribute nothing.
    /// This is the formula backends implement; <see cref="FlashBackward"/> is the independent check.
    /// </summary>
    public static (double[] dQ, double[] dK, double[] dV) FlashBackwardFromRowStats(double[] q, double[] k, double[] v, double[] lse, double[] drow,
        double[] dO, Dims x, long qOffset, long kOffset, bool causal, double scale)
    {
        var dq = new double[q.Length];
        var dk = new double[k.Length];
        var dv = new double[v.Length];
        for (int b = 0; b < x.B; b++)
            for (int h = 0; h < x.H; h++)
            {
                int g = h / x.Group;
                for (int i = 0; i < x.Nq; i++)
                {
                    double l = lse[x.L(b, h, i)];
                    if (double.IsNegativeInfinity(l)) continue;
                    double dr = drow[x.L(b, h, i)];
                    long qi = x.Q(b, i, h, 0), oi = x.O(b, i, h, 0);
                    for (int j = 0; j < x.Nk; j++)
                    {
                        if (!Visible(causal, qOffset, kOffset, i, j)) continue;
                        long ki = x.K(b, j, g, 0), vi = x.V(b, j, g, 0);
                        double dot = 0;
                        for (int d = 0; d < x.D; d++) dot += q[qi + d] * k[ki + d];
                        double p = Math.Exp(dot * scale - l);
                        double dp = 0;
                        for (int e = 0; e < x.Dv; e++)
                        {
                            dp += dO[oi + e] * v[vi + e];
                            dv[vi + e] += p * dO[oi + e];
                        }
                        double ds = p * (dp - dr) * scale;
                        for (int d = 0; d < x.D; d++)
                        {
                            dq[qi + d] += ds * k[ki + d];
                            dk[ki + d] += ds * q[qi + d];
                        }
                    }
                }
            }
        return (dq, dk, dv);
    }

    /// <summary>Merges partial state b into a (returns new arrays): the LSE-weighted average; -inf rows weigh 0.</summary>
    public static (double[] O, double[] Lse) MergeSoftmax(double[] oA, double[] lseA, double[] oB, double[] lseB, int batch, int n, int heads, int dv)
    {
        var o = new double[oA.Length];
        var lse = new double[lseA.Length];
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < heads; h++)
                for (int i = 0; i < n; i++)
                {
                    long li = ((long)b * heads + h) * n + i;
                    double la = lseA[li], lb = lseB[li], m = Math.Max(la, lb);
                    double wa = double.IsNegativeInfinity(la) ? 0 : Math.Exp(la - m);
                    double wb = double.IsNegativeInfinity(lb) ? 0 : Math.Exp(lb - m);
                    lse[li] = wa + wb == 0 ? double.NegativeInfinity : m + Math.Log(wa + wb);
                    for (int e = 0; e < dv; e++)
                    {
                        long oi = (((long)b * n + i) * heads + h) * dv + e;
                        o[oi] = wa + wb == 0 ? 0 : (wa * oA[oi] + wb * oB[oi]) / (wa + wb);
                    }
                }
        return (o, lse);
    }

    /// <summary>
    /// Lightning attention by the direct sum. Causal: o_i = Σ_{j≤i} λ^(i−j)(q_i·k_j)v_j + λ^(i+1) q_i S0,
    /// S_end = λ^N S0 + Σ_j λ^(N−1−j) k_jᵀ v_j. Non-causal: O = Q(S0 + KᵀV), S_end = S0 + KᵀV.
    /// </summary>
    public static (double[] O, double[] SEnd) LightningForward(double[] q, double[] k, double[] v, double[] decay, bool causal, double[]? s0, Dims x)
    {
        var o = new double[(long)x.B * x.Nq * x.H * x.Dv];
        var sEnd = new double[(long)x.B * x.H * x.D * x.Dv];
        int n = x.Nq;
        for (int b = 0; b < x.B; b++)
            for (int h = 0; h < x.H; h++)
            {
                int g = h / x.Group;
                double lam = causal ? decay[h] : 1.0;
                for (int i = 0; i < n; i++)
                {
                    for (int j = 0; j < n; j++)
                    {
                        if (causal && j > i) break;
                        double w = causal ? Math.Pow(lam, i - j) : 1.0;
                        double dot = 0;
                        for (int d = 0; d < x.D; d++) dot += q[x.Q(b, i, h, d)] * k[x.K(b, j, g, d)];
                        for (int e = 0; e < x.Dv; e++) o[x.O(b, i, h, e)] += w * dot * v[x.V(b, j, g, e)];
                    }
                    if (s0 is not null)
                    {
                        double w = causal ? Math.Pow(lam, i + 1) : 1.0;
                        for (int e = 0; e < x.Dv; e++)
                        {
                            double acc = 0;
                            for (int d = 0; d < x.D; d++) acc += q[x.Q(b, i, h, d)] * s0[x.S(b, h, d, e)];
                            o[x.O(b, i, h, e)] += w * acc;
                        }
                    }
                }
                for (int d = 0; d < x.D; d++)
                    for (int e = 0; e < x.Dv; e++)
                    {
                        double acc = s0 is null ? 0 : Math.Pow(lam, n) * s0[x.S(b, h, d, e)];
                        for (int j = 0; j < n; j++) acc += Math.Pow(lam, n - 1 - j) * k[x.K(b, j, g, d)] * v[x.V(b, j, g, e)];
                        sEnd[x.S(b, h, d, e)] = acc;
                    }
            }
        return (o, sEnd);
    }

    /// <summary>Gradients of Σ O∘dO + Σ S_end∘dS_end through <see cref="LightningForward"/>.</summary>
    public static (double[] dQ, double[] dK, double[] dV, double[] dS0) LightningBackward(double[] q, double[] k, double[] v, double[] decay, bool causal,
        double[]? s0, double[] dO, double[]? dSEnd, Dims x)
    {
        var dq = new double[q.Length];
        var dk = new double[k.Length];
        var dv = new double[v.Length];
        var ds0 = new double[(long)x.B * x.H * x.D * x.Dv];
        int n = x.Nq;
        for (int b = 0; b < x.B; b++)
            for (int h = 0; h < x.H; h++)
            {
                int g = h / x.Group;
                double lam = causal ? decay[h] : 1.0;
                double S0(int d, int e) => s0 is null ? 0 : s0[x.S(b, h, d, e)];
                double GE(int d, int e) => dSEnd is null ? 0 : dSEnd[x.S(b, h, d, e)];
                for (int i = 0; i < n; i++)
                    for (int j = 0; j < n; j++)
                    {
                        if (causal && j > i) continue;
                        double w = causal ? Math.Pow(lam, i - j) : 1.0;
                        double qk = 0, gv = 0;
                        for (int d = 0; d < x.D; d++) qk += q[x.Q(b, i, h, d)] * k[x.K(b, j, g, d)];
                        for (int e = 0; e < x.Dv; e++) gv += dO[x.O(b, i, h, e)] * v[x.V(b, j, g, e)];
                        for (int d = 0; d < x.D; d++)
                        {
                            dq[x.Q(b, i, h, d)] += w * gv * k[x.K(b, j, g, d)];
                            dk[x.K(b, j, g, d)] += w * gv * q[x.Q(b, i, h, d)];
                        }
                        for (int e = 0; e < x.Dv; e++) dv[x.V(b, j, g, e)] += w * qk * dO[x.O(b, i, h, e)];
                    }
                // Through S0 (o_i += λ^(i+1) q_i S0) and S_end (λ^N S0 + Σ λ^(N−1−j) k_jᵀ v_j).
                for (int i = 0; i < n; i++)
                {
                    double w = causal ? Math.Pow(lam, i + 1) : 1.0;
                    for (int d = 0; d < x.D; d++)
                        for (int e = 0; e < x.Dv; e++)
                        {
                            dq[x.Q(b, i, h, d)] += w * S0(d, e) * dO[x.O(b, i, h, e)];
                            ds0[x.S(b, h, d, e)] += w * q[x.Q(b, i, h, d)] * dO[x.O(b, i, h, e)];
                        }
                }
                for (int j = 0; j < n; j++)
                {
                    double w = Math.Pow(lam, n - 1 - j);
                    for (int d = 0; d < x.D; d++)
                        for (int e = 0; e < x.Dv; e++)
                        {
                            dk[x.K(b, j, g, d)] += w * GE(d, e) * v[x.V(b, j, g, e)];
                            dv[x.V(b, j, g, e)] += w * GE(d, e) * k[x.K(b, j, g, d)];
                        }
                }
                for (int d = 0; d < x.D; d++)
                    for (int e = 0; e < x.Dv; e++) ds0[x.S(b, h, d, e)] += Math.Pow(lam, n) * GE(d, e);
            }
        return (dq, dk, dv, ds0);
    }

    /// <summary>Chunk state M = Σ_j λ^(N−1−j) k_jᵀ v_j per query head (λ = 1 when not causal).</summary>
    public static double[] ChunkState(double[] k, double[] v, double[] decay, bool causal, Dims x)
    {
        var m = new double[(long)x.B * x.H * x.D * x.Dv];
        for (int b = 0; b < x.B; b++)
            for (int h = 0; h < x.H; h++)
            {
                int g = h / x.Group;
                double lam = causal ? decay[h] : 1.0;
                for (int j = 0; j < x.Nk; j++)
                {
                    double w = Math.Pow(lam, x.Nk - 1 - j);
                    for (int d = 0; d < x.D; d++)
                        for (int e = 0; e < x.Dv; e++) m[x.S(b, h, d, e)] += w * k[x.K(b, j, g, d)] * v[x.V(b, j, g, e)];
                }
            }
        return m;
    }

    /// <summary>Chunk-state mirror dM = Σ_i λ^(i+1) q_iᵀ dO_i per head (λ = 1 when not causal).</summary>
    public static double[] ChunkStateBackward(double[] q, double[] dO, double[] decay, bool causal, Dims x)
    {
        var m = new double[(long)x.B * x.H * x.D * x.Dv];
        for (int b = 0; b < x.B; b++)
            for (int h = 0; h < x.H; h++)
            {
                double lam = causal ? decay[h] : 1.0;
                for (int i = 0; i < x.Nq; i++)
                {
                    double w = Math.Pow(lam, i + 1);
                    for (int d = 0; d < x.D; d++)
                        for (int e = 0; e < x.Dv; e++) m[x.S(b, h, d, e)] += w * q[x.Q(b, i, h, d)] * dO[x.O(b, i, h, e)];
                }
            }
        return m;
    }

    /// <summary>Deterministic values in [-1, 1) (a fixed-seed generator), as fp32-representable doubles.</summary>
    public static double[] Random(long count, int seed, double amplitude = 1.0)
    {
        var r = new System.Random(seed);
        var a = new double[count];
        for (long i = 0; i < count; i++) a[i] = (float)((r.NextDouble() * 2 - 1) * amplitude);
        return a;
    }

    /// <summary>
    /// max |a − b| / max(max |b|, <paramref name="floor"/>): the relative error every test uses. Matching -inf
    /// entries count as equal; a NaN anywhere is an infinite error. The floor keeps an output that is zero in
    /// exact arithmetic (dQ of a one-key row, say) from turning fp32 roundoff into a huge ratio: it is then an
    /// absolute check against <paramref name="floor"/> times the tolerance.
    /// </summary>
    public static double RelativeError(ReadOnlySpan<float> actual, ReadOnlySpan<double> expected, double floor = 1e-2)
    {
        if (actual.Length != expected.Length) throw new ArgumentException($"Lengths differ: {actual.Length} vs {expected.Length}.", nameof(actual));
        double maxErr = 0, maxRef = 0;
        for (int i = 0; i < actual.Length; i++)
        {
            if (float.IsNaN(actual[i])) return double.PositiveInfinity;
            if (double.IsInfinity(expected[i]) || float.IsInfinity(actual[i]))
            {
                if (expected[i] == actual[i]) continue;
                return double.PositiveInfinity;
            }
            maxErr = Math.Max(maxErr, Math.Abs(actual[i] - expected[i]));
            maxRef = Math.Max(maxRef, Math.Abs(expected[i]));
        }
        return maxErr / Math.Max(maxRef, floor);
    }
}
