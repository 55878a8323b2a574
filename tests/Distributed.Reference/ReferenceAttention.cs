using System.Numerics;

namespace Distributed.Reference;

/// <summary>
/// The one fp64 reference for every block operation: naive and obviously correct (causal sums are the direct
/// O(N²) ones), parallel only over (batch, KV head) with each output owned by one thread, so it is deterministic.
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

    // Rows are contiguous spans; int-indexed span loops keep the naive sums fast enough for N ~ 512.
    private static Span<double> Row(double[] a, long start, int length) => a.AsSpan(checked((int)start), length);

    // Vector<double> lanes only reorder fp64 sums: far below any tolerance a test uses, and still deterministic.
    private static double Dot(ReadOnlySpan<double> a, ReadOnlySpan<double> b)
    {
        if (b.Length < a.Length) throw new ArgumentException("b is shorter than a.", nameof(b));
        int w = Vector<double>.Count, i = 0;
        var acc = Vector<double>.Zero;
        for (; i <= a.Length - w; i += w) acc += new Vector<double>(a.Slice(i)) * new Vector<double>(b.Slice(i));
        double s = Vector.Sum(acc);
        for (; i < a.Length; i++) s += a[i] * b[i];
        return s;
    }

    /// <summary>y += a·x.</summary>
    private static void Axpy(double a, ReadOnlySpan<double> x, Span<double> y)
    {
        if (y.Length < x.Length) throw new ArgumentException("y is shorter than x.", nameof(y));
        int w = Vector<double>.Count, i = 0;
        for (; i <= x.Length - w; i += w) (new Vector<double>(y.Slice(i)) + a * new Vector<double>(x.Slice(i))).CopyTo(y.Slice(i));
        for (; i < x.Length; i++) y[i] += a * x[i];
    }

    /// <summary>
    /// Runs <paramref name="body"/> once per (batch, KV head) in parallel. Each call owns every output element it
    /// writes (its query heads' rows and its KV head's rows), and sums in a fixed order, so results are deterministic.
    /// </summary>
    private static void ForEachKvHead(Dims x, Action<int, int> body) =>
        Parallel.For(0, x.B * x.Hk, bg => body(bg / x.Hk, bg % x.Hk));

    /// <summary>
    /// Softmax attention: O [B,Nq,H,Dv] and LSE [B,H,Nq] (natural log of Σ_j exp(scale·q_i·k_j) over visible keys).
    /// Rows that see no key get O = 0, LSE = -inf.
    /// </summary>
    public static (double[] O, double[] Lse) FlashForward(double[] q, double[] k, double[] v, Dims x, long qOffset, long kOffset, bool causal, double scale)
    {
        var o = new double[(long)x.B * x.Nq * x.H * x.Dv];
        var lse = new double[(long)x.B * x.H * x.Nq];
        ForEachKvHead(x, (b, g) =>
        {
            var s = new double[x.Nk];
            for (int h = g * x.Group; h < (g + 1) * x.Group; h++)
                for (int i = 0; i < x.Nq; i++)
                {
                    var qi = Row(q, x.Q(b, i, h, 0), x.D);
                    var oi = Row(o, x.O(b, i, h, 0), x.Dv);
                    double max = double.NegativeInfinity;
                    for (int j = 0; j < x.Nk; j++)
                    {
                        s[j] = Visible(causal, qOffset, kOffset, i, j) ? scale * Dot(qi, Row(k, x.K(b, j, g, 0), x.D)) : double.NegativeInfinity;
                        max = Math.Max(max, s[j]);
                    }
                    if (double.IsNegativeInfinity(max)) { lse[x.L(b, h, i)] = double.NegativeInfinity; continue; }
                    double sum = 0;
                    for (int j = 0; j < x.Nk; j++) sum += Math.Exp(s[j] - max); // exp(-inf) = 0 for masked keys
                    for (int j = 0; j < x.Nk; j++)
                        if (!double.IsNegativeInfinity(s[j])) Axpy(Math.Exp(s[j] - max) / sum, Row(v, x.V(b, j, g, 0), x.Dv), oi);
                    lse[x.L(b, h, i)] = max + Math.Log(sum);
                }
        });
        return (o, lse);
    }

    /// <summary>
    /// Gradients of L = Σ O∘dO through softmax attention over the given keys, from the definition of the softmax
    /// Jacobian: P = softmax(scale·QKᵀ), dP = dO Vᵀ, dS = P ∘ (dP − rowsum(dO∘O)), dQ = scale·dS K,
    /// dK = scale·dSᵀ Q, dV = Pᵀ dO (GQA: summed over the query heads of a KV head). Checked by finite differences.
    /// </summary>
    public static (double[] dQ, double[] dK, double[] dV) FlashBackward(double[] q, double[] k, double[] v, double[] dO, Dims x,
        long qOffset, long kOffset, bool causal, double scale)
    {
        var (o, lse) = FlashForward(q, k, v, x, qOffset, kOffset, causal, scale);
        var drow = new double[lse.Length];
        for (int b = 0; b < x.B; b++)
            for (int h = 0; h < x.H; h++)
                for (int i = 0; i < x.Nq; i++)
                    drow[x.L(b, h, i)] = Dot(Row(dO, x.O(b, i, h, 0), x.Dv), Row(o, x.O(b, i, h, 0), x.Dv));
        return FlashBackwardFromRowStats(q, k, v, lse, drow, dO, x, qOffset, kOffset, causal, scale);
    }

    /// <summary>
    /// The softmax backward over one K/V block given the row statistics of the <b>whole</b> attention
    /// (LSE [B,H,Nq] and Drow = rowsum(dO∘O) [B,H,Nq]), as a kernel on a KV shard receives them:
    /// P = exp(scale·q·k − LSE), dS = P∘(dO·v − Drow). Rows with LSE = -inf contribute nothing.
    /// </summary>
    public static (double[] dQ, double[] dK, double[] dV) FlashBackwardFromRowStats(double[] q, double[] k, double[] v, double[] lse, double[] drow,
        double[] dO, Dims x, long qOffset, long kOffset, bool causal, double scale)
    {
        var dq = new double[q.Length];
        var dk = new double[k.Length];
        var dv = new double[v.Length];
        ForEachKvHead(x, (b, g) =>
        {
            for (int h = g * x.Group; h < (g + 1) * x.Group; h++)
                for (int i = 0; i < x.Nq; i++)
                {
                    double l = lse[x.L(b, h, i)];
                    if (double.IsNegativeInfinity(l)) continue;
                    double dr = drow[x.L(b, h, i)];
                    var qi = Row(q, x.Q(b, i, h, 0), x.D);
                    var dqi = Row(dq, x.Q(b, i, h, 0), x.D);
                    var doi = Row(dO, x.O(b, i, h, 0), x.Dv);
                    for (int j = 0; j < x.Nk; j++)
                    {
                        if (!Visible(causal, qOffset, kOffset, i, j)) continue;
                        var kj = Row(k, x.K(b, j, g, 0), x.D);
                        var vj = Row(v, x.V(b, j, g, 0), x.Dv);
                        double p = Math.Exp(scale * Dot(qi, kj) - l);
                        double ds = p * (Dot(doi, vj) - dr) * scale;
                        Axpy(p, doi, Row(dv, x.V(b, j, g, 0), x.Dv));
                        Axpy(ds, kj, dqi);
                        Axpy(ds, qi, Row(dk, x.K(b, j, g, 0), x.D));
                    }
                }
        });
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
    /// Lightning attention. Causal, by the direct sum: o_i = Σ_{j≤i} λ^(i−j)(q_i·k_j)v_j + λ^(i+1) q_i S0,
    /// S_end = λ^N S0 + Σ_j λ^(N−1−j) k_jᵀ v_j. Non-causal (λ ignored): T = S0 + KᵀV, O = Q T, S_end = T.
    /// Q [B,N,H,D], K [B,N,Hk,D], V [B,N,Hk,Dv] (x.Nq = x.Nk = N), S0 and S_end [B,H,D,Dv]; s0 null means zero.
    /// </summary>
    public static (double[] O, double[] SEnd) LightningForward(double[] q, double[] k, double[] v, double[] decay, bool causal, double[]? s0, Dims x)
    {
        var o = new double[(long)x.B * x.Nq * x.H * x.Dv];
        var sEnd = new double[(long)x.B * x.H * x.D * x.Dv];
        int n = x.Nq;
        ForEachKvHead(x, (b, g) =>
        {
            for (int h = g * x.Group; h < (g + 1) * x.Group; h++)
            {
                var pw = Powers(causal ? decay[h] : 1.0, n + 1);
                Span<double> StateRow(double[] a, int d) => Row(a, x.S(b, h, d, 0), x.Dv);
                // S_end (= T when not causal): λ^N S0 + Σ_j λ^(N−1−j) k_jᵀ v_j.
                for (int d = 0; d < x.D; d++)
                    if (s0 is not null) Axpy(pw[n], StateRow(s0, d), StateRow(sEnd, d));
                for (int j = 0; j < n; j++)
                {
                    var kj = Row(k, x.K(b, j, g, 0), x.D);
                    var vj = Row(v, x.V(b, j, g, 0), x.Dv);
                    for (int d = 0; d < x.D; d++) Axpy(pw[n - 1 - j] * kj[d], vj, StateRow(sEnd, d));
                }
                for (int i = 0; i < n; i++)
                {
                    var qi = Row(q, x.Q(b, i, h, 0), x.D);
                    var oi = Row(o, x.O(b, i, h, 0), x.Dv);
                    if (!causal)
                    {
                        for (int d = 0; d < x.D; d++) Axpy(qi[d], StateRow(sEnd, d), oi);
                        continue;
                    }
                    for (int j = 0; j <= i; j++)
                        Axpy(pw[i - j] * Dot(qi, Row(k, x.K(b, j, g, 0), x.D)), Row(v, x.V(b, j, g, 0), x.Dv), oi);
                    if (s0 is not null)
                        for (int d = 0; d < x.D; d++) Axpy(pw[i + 1] * qi[d], StateRow(s0, d), oi);
                }
            }
        });
        return (o, sEnd);
    }

    /// <summary>
    /// Gradients of L = Σ O∘dO + Σ S_end∘dS_end through <see cref="LightningForward"/>, term by term from its
    /// formulas (dSEnd null means zero). dS0 [B,H,D,Dv] is returned even when s0 is null (the gradient at S0 = 0).
    /// Checked by finite differences.
    /// </summary>
    public static (double[] dQ, double[] dK, double[] dV, double[] dS0) LightningBackward(double[] q, double[] k, double[] v, double[] decay, bool causal,
        double[]? s0, double[] dO, double[]? dSEnd, Dims x)
    {
        var dq = new double[q.Length];
        var dk = new double[k.Length];
        var dv = new double[v.Length];
        var ds0 = new double[(long)x.B * x.H * x.D * x.Dv];
        int n = x.Nq;
        var t = causal ? null : LightningForward(q, k, v, decay, false, s0, x).SEnd;
        ForEachKvHead(x, (b, g) =>
        {
            for (int h = g * x.Group; h < (g + 1) * x.Group; h++)
            {
                var pw = Powers(causal ? decay[h] : 1.0, n + 1);
                Span<double> StateRow(double[] a, int d) => Row(a, x.S(b, h, d, 0), x.Dv);
                if (t is not null)
                {
                    // T = S0 + KᵀV, O = Q T, S_end = T: the gradient at T is G = QᵀdO + dS_end, and it flows
                    // to S0 as is, to K as V Gᵀ and to V as K G; dQ = dO Tᵀ.
                    var gT = ds0; // G is built in place: it is dS0.
                    for (int d = 0; d < x.D; d++)
                        if (dSEnd is not null) Axpy(1, StateRow(dSEnd, d), StateRow(gT, d));
                    for (int i = 0; i < n; i++)
                    {
                        var qi = Row(q, x.Q(b, i, h, 0), x.D);
                        var doi = Row(dO, x.O(b, i, h, 0), x.Dv);
                        var dqi = Row(dq, x.Q(b, i, h, 0), x.D);
                        for (int d = 0; d < x.D; d++)
                        {
                            Axpy(qi[d], doi, StateRow(gT, d));
                            dqi[d] += Dot(StateRow(t, d), doi);
                        }
                    }
                    for (int j = 0; j < n; j++)
                    {
                        var kj = Row(k, x.K(b, j, g, 0), x.D);
                        var vj = Row(v, x.V(b, j, g, 0), x.Dv);
                        var dkj = Row(dk, x.K(b, j, g, 0), x.D);
                        var dvj = Row(dv, x.V(b, j, g, 0), x.Dv);
                        for (int d = 0; d < x.D; d++)
                        {
                            dkj[d] += Dot(StateRow(gT, d), vj);
                            Axpy(kj[d], StateRow(gT, d), dvj);
                        }
                    }
                    continue;
                }
                // o_i += λ^(i−j) (q_i·k_j) v_j for j ≤ i
                for (int i = 0; i < n; i++)
                {
                    var qi = Row(q, x.Q(b, i, h, 0), x.D);
                    var doi = Row(dO, x.O(b, i, h, 0), x.Dv);
                    var dqi = Row(dq, x.Q(b, i, h, 0), x.D);
                    for (int j = 0; j <= i; j++)
                    {
                        var kj = Row(k, x.K(b, j, g, 0), x.D);
                        var vj = Row(v, x.V(b, j, g, 0), x.Dv);
                        double w = pw[i - j], gv = Dot(doi, vj);
                        Axpy(w * gv, kj, dqi);
                        Axpy(w * gv, qi, Row(dk, x.K(b, j, g, 0), x.D));
                        Axpy(w * Dot(qi, kj), doi, Row(dv, x.V(b, j, g, 0), x.Dv));
                    }
                    // o_i += λ^(i+1) q_i S0
                    for (int d = 0; d < x.D; d++)
                    {
                        if (s0 is not null) dqi[d] += pw[i + 1] * Dot(StateRow(s0, d), doi);
                        Axpy(pw[i + 1] * qi[d], doi, StateRow(ds0, d));
                    }
                }
                if (dSEnd is null) continue;
                // S_end = λ^N S0 + Σ_j λ^(N−1−j) k_jᵀ v_j
                for (int j = 0; j < n; j++)
                {
                    var kj = Row(k, x.K(b, j, g, 0), x.D);
                    var vj = Row(v, x.V(b, j, g, 0), x.Dv);
                    var dkj = Row(dk, x.K(b, j, g, 0), x.D);
                    var dvj = Row(dv, x.V(b, j, g, 0), x.Dv);
                    for (int d = 0; d < x.D; d++)
                    {
                        dkj[d] += pw[n - 1 - j] * Dot(StateRow(dSEnd, d), vj);
                        Axpy(pw[n - 1 - j] * kj[d], StateRow(dSEnd, d), dvj);
                    }
                }
                for (int d = 0; d < x.D; d++) Axpy(pw[n], StateRow(dSEnd, d), StateRow(ds0, d));
            }
        });
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
