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
                    long qi = x.Q(b, i, h, 0), oi = x.O(b, i, h, 0);
                    double max = double.NegativeInfinity;
                    for (int j = 0; j < x.Nk; j++)
                    {
                        if (!Visible(causal, qOffset, kOffset, i, j)) { s[j] = double.NegativeInfinity; continue; }
                        long ki = x.K(b, j, g, 0);
                        double dot = 0;
                        for (int d = 0; d < x.D; d++) dot += q[qi + d] * k[ki + d];
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
                        long vi = x.V(b, j, g, 0);
                        for (int e = 0; e < x.Dv; e++) o[oi + e] += p * v[vi + e];
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
                    long qi = x.Q(b, i, h, 0), oi = x.O(b, i, h, 0);
                    double drow = 0;
                    for (int e = 0; e < x.Dv; e++) drow += dO[oi + e] * o[oi + e];
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
                        double ds = p * (dp - drow) * scale;
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
    /// S_end = λ^N S0 + Σ_j λ^(N−1−j) k_jᵀ v_j. Non-causal (λ ignored): O = Q(S0 + KᵀV), S_end = S0 + KᵀV.
    /// Q [B,N,H,D], K [B,N,Hk,D], V [B,N,Hk,Dv] (x.Nq = x.Nk = N), S0 and S_end [B,H,D,Dv]; s0 null means zero.
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
                var pw = Powers(causal ? decay[h] : 1.0, n + 1);
                long sb = x.S(b, h, 0, 0);
                for (int i = 0; i < n; i++)
                {
                    long qi = x.Q(b, i, h, 0), oi = x.O(b, i, h, 0);
                    for (int j = 0; j < n; j++)
                    {
                        if (causal && j > i) break;
                        long ki = x.K(b, j, g, 0), vi = x.V(b, j, g, 0);
                        double dot = 0;
                        for (int d = 0; d < x.D; d++) dot += q[qi + d] * k[ki + d];
                        double w = (causal ? pw[i - j] : 1.0) * dot;
                        for (int e = 0; e < x.Dv; e++) o[oi + e] += w * v[vi + e];
                    }
                    if (s0 is null) continue;
                    for (int d = 0; d < x.D; d++)
                    {
                        double qd = pw[i + 1] * q[qi + d];
                        for (int e = 0; e < x.Dv; e++) o[oi + e] += qd * s0[sb + (long)d * x.Dv + e];
                    }
                }
                if (s0 is not null)
                    for (int t = 0; t < x.D * x.Dv; t++) sEnd[sb + t] = pw[n] * s0[sb + t];
                for (int j = 0; j < n; j++)
                {
                    long ki = x.K(b, j, g, 0), vi = x.V(b, j, g, 0);
                    for (int d = 0; d < x.D; d++)
                    {
                        double kd = pw[n - 1 - j] * k[ki + d];
                        for (int e = 0; e < x.Dv; e++) sEnd[sb + (long)d * x.Dv + e] += kd * v[vi + e];
                    }
                }
            }
        return (o, sEnd);
    }

    /// <summary>
    /// Gradients of L = Σ O∘dO + Σ S_end∘dS_end through <see cref="LightningForward"/>, term by term from its
    /// formulas (dSEnd null means zero). dS0 [B,H,D,Dv] is returned even when s0 is null (the gradient at S0 = 0).
    /// </summary>
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
                var pw = Powers(causal ? decay[h] : 1.0, n + 1);
                long sb = x.S(b, h, 0, 0);
                // o_i += w_ij (q_i·k_j) v_j
                for (int i = 0; i < n; i++)
                {
                    long qi = x.Q(b, i, h, 0), oi = x.O(b, i, h, 0);
                    for (int j = 0; j < n; j++)
                    {
                        if (causal && j > i) break;
                        long ki = x.K(b, j, g, 0), vi = x.V(b, j, g, 0);
                        double w = causal ? pw[i - j] : 1.0;
                        double qk = 0, gv = 0;
                        for (int d = 0; d < x.D; d++) qk += q[qi + d] * k[ki + d];
                        for (int e = 0; e < x.Dv; e++) gv += dO[oi + e] * v[vi + e];
                        for (int d = 0; d < x.D; d++)
                        {
                            dq[qi + d] += w * gv * k[ki + d];
                            dk[ki + d] += w * gv * q[qi + d];
                        }
                        for (int e = 0; e < x.Dv; e++) dv[vi + e] += w * qk * dO[oi + e];
                    }
                }
                // o_i += λ^(i+1) q_i S0
                for (int i = 0; i < n; i++)
                {
                    long qi = x.Q(b, i, h, 0), oi = x.O(b, i, h, 0);
                    for (int d = 0; d < x.D; d++)
                    {
                        long sd = sb + (long)d * x.Dv;
                        double acc = 0;
                        for (int e = 0; e < x.Dv; e++)
                        {
                            if (s0 is not null) acc += s0[sd + e] * dO[oi + e];
                            ds0[sd + e] += pw[i + 1] * q[qi + d] * dO[oi + e];
                        }
                        dq[qi + d] += pw[i + 1] * acc;
                    }
                }
                if (dSEnd is null) continue;
                // S_end = λ^N S0 + Σ_j λ^(N−1−j) k_jᵀ v_j
                for (int j = 0; j < n; j++)
                {
                    long ki = x.K(b, j, g, 0), vi = x.V(b, j, g, 0);
                    double w = pw[n - 1 - j];
                    for (int d = 0; d < x.D; d++)
                    {
                        long sd = sb + (long)d * x.Dv;
                        double acc = 0;
                        for (int e = 0; e < x.Dv; e++)
                        {
                            acc += dSEnd[sd + e] * v[vi + e];
                            dv[vi + e] += w * dSEnd[sd + e] * k[ki + d];
                        }
                        dk[ki + d] += w * acc;
                    }
                }
                for (int t = 0; t < x.D * x.Dv; t++) ds0[sb + t] += pw[n] * dSEnd[sb + t];
            }
        return (dq, dk, dv, ds0);
    }

    /// <summary>Chunk state M = Σ_j λ^(N−1−j) k_jᵀ v_j [B,H,D,Dv] per query head (λ = 1 when not causal); N = x.Nk.</summary>
    public static double[] ChunkState(double[] k, double[] v, double[] decay, bool causal, Dims x)
    {
        var m = new double[(long)x.B * x.H * x.D * x.Dv];
        for (int b = 0; b < x.B; b++)
            for (int h = 0; h < x.H; h++)
            {
                int g = h / x.Group;
                var pw = Powers(causal ? decay[h] : 1.0, x.Nk);
                long sb = x.S(b, h, 0, 0);
                for (int j = 0; j < x.Nk; j++)
                {
                    long ki = x.K(b, j, g, 0), vi = x.V(b, j, g, 0);
                    for (int d = 0; d < x.D; d++)
                    {
                        double kd = pw[x.Nk - 1 - j] * k[ki + d];
                        for (int e = 0; e < x.Dv; e++) m[sb + (long)d * x.Dv + e] += kd * v[vi + e];
                    }
                }
            }
        return m;
    }

    /// <summary>Chunk-state mirror dM = Σ_i λ^(i+1) q_iᵀ dO_i [B,H,D,Dv] per head (λ = 1 when not causal); N = x.Nq.</summary>
    public static double[] ChunkStateBackward(double[] q, double[] dO, double[] decay, bool causal, Dims x)
    {
        var m = new double[(long)x.B * x.H * x.D * x.Dv];
        for (int b = 0; b < x.B; b++)
            for (int h = 0; h < x.H; h++)
            {
                var pw = Powers(causal ? decay[h] : 1.0, x.Nq + 1);
                long sb = x.S(b, h, 0, 0);
                for (int i = 0; i < x.Nq; i++)
                {
                    long qi = x.Q(b, i, h, 0), oi = x.O(b, i, h, 0);
                    for (int d = 0; d < x.D; d++)
                    {
                        double qd = pw[i + 1] * q[qi + d];
                        for (int e = 0; e < x.Dv; e++) m[sb + (long)d * x.Dv + e] += qd * dO[oi + e];
                    }
                }
            }
        return m;
    }

    /// <summary>λ^t for t in [0, count); each by Math.Pow so strong decay underflows cleanly to 0 without drift.</summary>
    private static double[] Powers(double lambda, int count)
    {
        var p = new double[count];
        for (int t = 0; t < count; t++) p[t] = Math.Pow(lambda, t);
        return p;
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
