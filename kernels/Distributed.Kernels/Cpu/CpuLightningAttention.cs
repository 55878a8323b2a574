using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace Distributed.Kernels.Cpu;

/// <summary>
/// Lightning (linear) attention on the CPU, blocked in 64-token blocks so the causal case is O(N):
/// the intra-block part <c>[(Q Kᵀ) ⊙ M] V</c> with <c>M_ij = λ^(i−j)</c>, the inter-block part
/// <c>diag(λ^(i+1)) Q S</c>, and the state update <c>S ← λ^b S + (diag(λ^(b−1−j)) K)ᵀ V</c>. Powers of λ
/// are formed as <c>exp(n·ln λ)</c> for n ≤ 65 or from global positions, flushed to 0 below 2^-64
/// (<see cref="PowerFloor"/>), never divided by. Parallel over (batch, head), forward and backward; with
/// GQA the backward writes each query head's dK and dV to its own slice of a partials buffer and sums
/// the group afterwards, so MQA still uses every thread.
/// </summary>
internal static unsafe class CpuLightningAttention
{
    private const int T = 64;

    /// <summary>Per-thread tile buffers of one (batch, head) sweep.</summary>
    private readonly struct Tiles
    {
        public readonly float* Q, K, V, G, Kt, Vt, A, dA, Tmp, Tmp2, S, St, Pw, Mask;
        public readonly int D, Dv, DP, DvP;

        public Tiles(int d, int dv)
        {
            D = d; Dv = dv; DP = CpuMath.Pad(d); DvP = CpuMath.Pad(dv);
            int dp = DP, dvp = DvP;
            long total = 4L * T * Math.Max(dp, dvp) + (long)d * T + (long)dv * T + 2 * T * T + 2L * T * Math.Max(dp, dvp) + (long)d * dvp + (long)dv * dp + T + 2 + 2 * T + 16;
            float* p = CpuParallel.Scratch(total);
            Q = p; p += T * dp;
            K = p; p += T * dp;
            V = p; p += T * dvp;
            G = p; p += T * dvp;
            Kt = p; p += d * T;
            Vt = p; p += dv * T;
            A = p; p += T * T;
            dA = p; p += T * T;
            Tmp = p; p += T * Math.Max(dp, dvp);
            Tmp2 = p; p += T * Math.Max(dp, dvp);
            S = p; p += d * dvp;
            St = p; p += dv * dp;
            Pw = p; p += T + 16;
            Mask = p;
        }

        /// <summary>Pw[n] = λ^n for n in [0, 65], flushed to 0 below <see cref="PowerFloor"/>.</summary>
        public void Powers(float lambda)
        {
            double ln = Math.Log(lambda);
            for (int n = 0; n <= T + 1; n++) Pw[n] = Power(n * ln);
            // Mask[m] = λ^(T−1−m) for m < T, 0 after: row i of the causal decay mask is Mask[T−1−i ..].
            for (int m = 0; m < T; m++) Mask[m] = Pw[T - 1 - m];
            new Span<float>(Mask + T, T).Clear();
        }
    }

    /// <summary>
    /// Decay powers below 2^-64 are flushed to exactly 0, so no hot loop multiplies by (or produces from a
    /// power) a float subnormal, which costs a microcode assist per operation on x86 and made small λ slow.
    /// A dropped term is below 2^-64 of the diagonal term (weight λ^0 = 1) of the same row: far under fp32
    /// resolution.
    /// </summary>
    public const double PowerFloor = 5.421010862427522e-20; // 2^-64

    /// <summary>e^x as a float, 0 when below <see cref="PowerFloor"/>.</summary>
    private static float Power(double x)
    {
        double p = Math.Exp(x);
        return p < PowerFloor ? 0f : (float)p;
    }

    /// <summary>
    /// Copies rows t0 .. t0+count of one head into a tile with row stride <paramref name="ld"/> (zero past
    /// <paramref name="width"/>), and asks for the same rows of the block <paramref name="ahead"/> tokens away
    /// (the next one the sweep reads) to be brought into L2 meanwhile: a head's rows are strided by the other
    /// heads, so the hardware prefetchers do not run a block ahead, and without this the copies wait on memory.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void LoadRows(float* X, int n, int heads, int width, int b, int head, int t0, int count, int ld, float* dst, int ahead = T)
    {
        int next = t0 + ahead;
        bool prefetch = ahead != 0 && next >= 0 && next < n && Sse.IsSupported;
        int nextCount = prefetch ? Math.Min(count, n - next) : 0;
        for (int j = 0; j < count; j++)
        {
            float* src = Row(X, n, heads, width, b, head, t0 + j);
            new Span<float>(src, width).CopyTo(new Span<float>(dst + j * ld, width));
            if (ld > width) new Span<float>(dst + j * ld + width, ld - width).Clear();
            if (j < nextCount) PrefetchRow(Row(X, n, heads, width, b, head, next + j), width);
        }
    }

    /// <summary>
    /// The rows the next block of a sweep reads or writes (up to 8 tensors), prefetched into L2 in parts
    /// between the current block's GEMMs. A head's rows are strided by the other heads, so the hardware
    /// prefetchers do not run a block ahead; and one burst of a block's prefetches (a thousand and more
    /// lines) overflows the miss queues, which then drop the prefetches that do not fit. Measured at
    /// (1,8,8192,128), causal forward, 2 threads: 12% less wall time than one burst per block.
    /// </summary>
    private struct NextBlockRows
    {
        private fixed long _first[8];
        private fixed long _stride[8];
        private fixed int _width[8];
        private int _count;
        private readonly int _rows;

        public NextBlockRows(int rows) => _rows = rows;

        /// <summary>Rows <c>first + j·stride</c> for j &lt; rows, <paramref name="width"/> floats each.</summary>
        public void Add(float* first, long stride, int width)
        {
            if (_rows <= 0 || _count == 8) return;
            _first[_count] = (long)first;
            _stride[_count] = stride;
            _width[_count] = width;
            _count++;
        }

        /// <summary>Prefetches part <paramref name="part"/> of <paramref name="parts"/> of every tensor's rows.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public readonly void Prefetch(int part, int parts)
        {
            if (_rows <= 0 || !Sse.IsSupported) return;
            int r0 = part * _rows / parts, r1 = (part + 1) * _rows / parts;
            for (int s = 0; s < _count; s++)
            {
                for (int j = r0; j < r1; j++) PrefetchRow((float*)_first[s] + j * _stride[s], _width[s]);
            }
        }
    }

    /// <summary>Asks for the cache lines of <paramref name="width"/> floats at <paramref name="row"/> to be brought into L2.</summary>
    private static void PrefetchRow(float* row, int width)
    {
        byte* p = (byte*)row;
        for (int line = 0; line < width * sizeof(float); line += 64) Sse.Prefetch1(p + line);
    }

    /// <summary>Row t0 of one head of a [B, n, heads, width] tensor.</summary>
    private static float* Row(float* X, int n, int heads, int width, int b, int head, int t0) => X + (((long)b * n + t0) * heads + head) * width;

    /// <summary>dst[c·ldDst + r] = src[r·ld + c] for r &lt; rows, c &lt; cols, in 16×16 blocks (in registers with AVX-512).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Transpose(float* src, int rows, int ld, int cols, float* dst, int ldDst)
    {
        for (int r0 = 0; r0 < rows; r0 += 16)
        {
            int r1 = Math.Min(rows, r0 + 16);
            for (int c0 = 0; c0 < cols; c0 += 16)
            {
                int c1 = Math.Min(cols, c0 + 16);
                if (r1 - r0 == 16 && c1 - c0 == 16 && CpuMath.UseVector512)
                {
                    CpuMath.Transpose16x16(src + (long)r0 * ld + c0, ld, dst + (long)c0 * ldDst + r0, ldDst);
                    continue;
                }
                for (int r = r0; r < r1; r++)
                {
                    float* row = src + (long)r * ld;
                    for (int c = c0; c < c1; c++) dst[(long)c * ldDst + r] = row[c];
                }
            }
        }
    }

    /// <summary>
    /// dst = (Q Kᵀ) ⊙ M for a block of <paramref name="bl"/> rows, 16-row bands at a time: band r0 computes
    /// only its first r0 + 16 columns (the rest of the band is above the diagonal and never read).
    /// <paramref name="kt"/> is Kᵀ [width, 64] zero-padded past the block; rows of q have stride <paramref name="ldq"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void LowerScores(int bl, int width, float* q, int ldq, float* kt, float* dst, float* mask)
    {
        for (int r0 = 0; r0 < bl; r0 += 16)
        {
            int rows = Math.Min(16, bl - r0), n = r0 + 16;
            CpuMath.Gemm(rows, n, width, q + r0 * ldq, 1, ldq, kt, T, dst + r0 * T, T, false);
            for (int i = r0; i < r0 + rows; i++) CpuMath.Multiply(dst + i * T, mask + T - 1 - i, n);
        }
    }

    /// <summary>c[i, :] = Σ_{j ≤ i} a[i, j] b[j, :] for i &lt; bl, where a is lower triangular from <see cref="LowerScores"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void LowerTimes(int bl, int n, float* a, float* b, int ldb, float* c, int ldc)
    {
        for (int r0 = 0; r0 < bl; r0 += 16)
            CpuMath.Gemm(Math.Min(16, bl - r0), n, Math.Min(r0 + 16, bl), a + r0 * T, 1, T, b, ldb, c + r0 * ldc, ldc, false);
    }

    /// <summary>c[j, :] = Σ_{j ≤ i &lt; bl} a[i, j] b[i, :] for j &lt; bl (aᵀ b), where a is lower triangular from <see cref="LowerScores"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void UpperTransposedTimes(int bl, int n, float* a, float* b, int ldb, float* c, int ldc)
    {
        for (int j0 = 0; j0 < bl; j0 += 16)
            CpuMath.Gemm(Math.Min(16, bl - j0), n, bl - j0, a + j0 * T + j0, T, 1, b + j0 * ldb, ldb, c + j0 * ldc, ldc, false);
    }

    /// <summary>kt[c·64 + r] = k[r·ld + c] for r &lt; bl, c &lt; cols, zero for r ≥ bl.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void TransposeTile(float* k, int bl, int ld, int cols, float* kt)
    {
        Transpose(k, bl, ld, cols, kt, T);
        if (bl < T) for (int c = 0; c < cols; c++) new Span<float>(kt + c * T + bl, T - bl).Clear();
    }

    private static void ClearPadding(float* dst, int rows, int ld, int usedRows)
    {
        if (usedRows < rows) new Span<float>(dst + usedRows * ld, (rows - usedRows) * ld).Clear();
    }

    /// <summary>A[i, j] ← λ^(i−j)·A[i, j] for j ≤ i &lt; bl, else 0 (<paramref name="mask"/> is <see cref="Tiles.Mask"/>).</summary>
    private static void CausalDecayMask(float* a, int bl, float* mask)
    {
        for (int i = 0; i < bl; i++) CpuMath.Multiply(a + i * T, mask + T - 1 - i, T);
    }

    private static void LoadState(float* src, int d, int dv, int dvp, float* dst)
    {
        for (int r = 0; r < d; r++)
        {
            new Span<float>(src + (long)r * dv, dv).CopyTo(new Span<float>(dst + r * dvp, dv));
            if (dvp > dv) new Span<float>(dst + r * dvp + dv, dvp - dv).Clear();
        }
    }

    private static void StoreState(float* src, int d, int dv, int dvp, float* dst)
    {
        for (int r = 0; r < d; r++) new Span<float>(src + r * dvp, dv).CopyTo(new Span<float>(dst + (long)r * dv, dv));
    }

    public static void Forward(CpuTensor q, CpuTensor k, CpuTensor v, float[] decay, bool causal, CpuTensor? s0, CpuTensor o, CpuTensor? sEnd, AttentionDims x, int threads)
    {
        float* Q = q.Pointer, K = k.Pointer, V = v.Pointer, O = o.Pointer;
        float* S0 = s0 is null ? null : s0.Pointer, SE = sEnd is null ? null : sEnd.Pointer;
        int N = x.Nq;
        CpuParallel.For(x.B * x.H, threads, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (bh) =>
        {
            int b = bh / x.H, h = bh % x.H, hk = h / x.Group;
            var t = new Tiles(x.D, x.Dv);
            long stateOff = (long)bh * x.D * x.Dv;
            t.Powers(causal ? decay[h] : 1f);
            if (S0 is null) new Span<float>(t.S, x.D * t.DvP).Clear();
            else LoadState(S0 + stateOff, x.D, x.Dv, t.DvP, t.S);
            if (!causal)
            {
                // S = S0 + Kᵀ V over all tokens, then O = Q S.
                for (int t0 = 0; t0 < N; t0 += T)
                {
                    int bl = Math.Min(T, N - t0);
                    LoadRows(K, N, x.Hk, x.D, b, hk, t0, bl, t.DP, t.K);
                    LoadRows(V, N, x.Hk, x.Dv, b, hk, t0, bl, t.DvP, t.V);
                    CpuMath.Gemm(x.D, t.DvP, bl, t.K, t.DP, 1, t.V, t.DvP, t.S, t.DvP, true);
                }
                for (int t0 = 0; t0 < N; t0 += T)
                {
                    int bl = Math.Min(T, N - t0);
                    LoadRows(Q, N, x.H, x.D, b, h, t0, bl, t.DP, t.Q);
                    CpuMath.Gemm(bl, t.DvP, x.D, t.Q, 1, t.DP, t.S, t.DvP, t.Tmp, t.DvP, false);
                    for (int i = 0; i < bl; i++)
                        new Span<float>(t.Tmp + i * t.DvP, x.Dv).CopyTo(new Span<float>(O + (((long)b * N + t0 + i) * x.H + h) * x.Dv, x.Dv));
                }
            }
            else
            {
                for (int t0 = 0; t0 < N; t0 += T)
                {
                    int bl = Math.Min(T, N - t0);
                    int nt = t0 + T;
                    var next = new NextBlockRows(nt < N ? Math.Min(T, N - nt) : 0);
                    next.Add(Row(Q, N, x.H, x.D, b, h, nt), (long)x.H * x.D, x.D);
                    next.Add(Row(K, N, x.Hk, x.D, b, hk, nt), (long)x.Hk * x.D, x.D);
                    next.Add(Row(V, N, x.Hk, x.Dv, b, hk, nt), (long)x.Hk * x.Dv, x.Dv);
                    next.Add(Row(O, N, x.H, x.Dv, b, h, nt), (long)x.H * x.Dv, x.Dv);
                    LoadRows(Q, N, x.H, x.D, b, h, t0, bl, t.DP, t.Q, 0);
                    LoadRows(K, N, x.Hk, x.D, b, hk, t0, bl, t.DP, t.K, 0);
                    LoadRows(V, N, x.Hk, x.Dv, b, hk, t0, bl, t.DvP, t.V, 0);
                    TransposeTile(t.K, bl, t.DP, x.D, t.Kt);
                    // Intra-block: [(Q Kᵀ) ⊙ M] V, only the 16-row bands on and below the diagonal.
                    LowerScores(bl, x.D, t.Q, t.DP, t.Kt, t.A, t.Mask);
                    next.Prefetch(0, 4);
                    LowerTimes(bl, t.DvP, t.A, t.V, t.DvP, t.Tmp, t.DvP);
                    next.Prefetch(1, 4);
                    // Inter-block: + diag(λ^(i+1)) Q S, accumulated onto the same tile.
                    for (int i = 0; i < bl; i++) CpuMath.ScaleTo(t.Tmp2 + i * t.DP, t.Q + i * t.DP, t.DP, t.Pw[i + 1]);
                    CpuMath.Gemm(bl, t.DvP, x.D, t.Tmp2, 1, t.DP, t.S, t.DvP, t.Tmp, t.DvP, true);
                    next.Prefetch(2, 4);
                    for (int i = 0; i < bl; i++)
                        new Span<float>(t.Tmp + i * t.DvP, x.Dv).CopyTo(new Span<float>(O + (((long)b * N + t0 + i) * x.H + h) * x.Dv, x.Dv));
                    // State: S ← λ^bl S + (diag(λ^(bl−1−j)) K)ᵀ V.
                    for (int j = 0; j < bl; j++) CpuMath.Scale(t.K + j * t.DP, t.DP, t.Pw[bl - 1 - j]);
                    CpuMath.Scale(t.S, x.D * t.DvP, t.Pw[bl]);
                    CpuMath.Gemm(x.D, t.DvP, bl, t.K, t.DP, 1, t.V, t.DvP, t.S, t.DvP, true);
                    next.Prefetch(3, 4);
                }
            }
            if (SE is not null) StoreState(t.S, x.D, x.Dv, t.DvP, SE + stateOff);
        });
    }

    public static void Backward(CpuTensor q, CpuTensor k, CpuTensor v, float[] decay, bool causal, CpuTensor? s0, CpuTensor dO, CpuTensor? dSEnd,
        CpuTensor dQ, CpuTensor dK, CpuTensor dV, CpuTensor? dS0, AttentionDims x, int threads, PinnedBuffer partials)
    {
        float* Q = q.Pointer, K = k.Pointer, V = v.Pointer, G = dO.Pointer, DQ = dQ.Pointer, DK = dK.Pointer, DV = dV.Pointer;
        float* S0 = s0 is null ? null : s0.Pointer, GE = dSEnd is null ? null : dSEnd.Pointer, GS = dS0 is null ? null : dS0.Pointer;
        int N = x.Nq, D = x.D, Dv = x.Dv;
        // One query head per task. Without GQA a task owns its dK/dV rows; with it, every query head
        // writes its own partial dK/dV ([B·H, N, D] and [B·H, N, Dv]) and the group is summed below.
        bool direct = x.Group == 1;
        long heads = (long)x.B * x.H;
        float* PK = direct ? null : partials.Get(heads * N * (D + Dv));
        float* PV = direct ? null : PK + heads * N * D;
        CpuParallel.For(x.B * x.H, threads, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (bh) =>
        {
            int b = bh / x.H, h = bh % x.H, hk = h / x.Group;
            var t = new Tiles(D, Dv);
            int DP = t.DP, DvP = t.DvP;
            var dst = direct
                ? new Gradients(DK + ((long)b * N * x.Hk + hk) * D, (long)x.Hk * D, DV + ((long)b * N * x.Hk + hk) * Dv, (long)x.Hk * Dv)
                : new Gradients(PK + bh * (long)N * D, D, PV + bh * (long)N * Dv, Dv);
            long stateOff = (long)bh * D * Dv;
            t.Powers(causal ? decay[h] : 1f);
            if (S0 is null) new Span<float>(t.S, D * DvP).Clear();
            else LoadState(S0 + stateOff, D, Dv, DvP, t.S);
            if (!causal)
            {
                // The non-causal path accumulates into dK and dV; the causal one writes every row in sweep 1.
                for (int i = 0; i < N; i++)
                {
                    new Span<float>(dst.K + i * dst.KStride, D).Clear();
                    new Span<float>(dst.V + i * dst.VStride, Dv).Clear();
                }
                NonCausalBackward(Q, K, V, G, DQ, dst, GE, GS, x, t, b, h, hk, stateOff);
                return;
            }
            // Sweep 1, forwards, carrying Sᵀ ([Dv, DP], updated in place, never transposed per block). Every
            // block-local term is finished here: dq_i = Σ_{j≤i} dA_ij k_j + λ^(i+1) dO_i Sᵀ, and the intra-block
            // parts of dk_j = Σ_{i≥j} dA_ij q_i and dv_j = Σ_{i≥j} A_ij dO_i, with A = (Q Kᵀ) ⊙ M and
            // dA = (dO Vᵀ) ⊙ M computed once, only their 16-row bands on and below the diagonal.
            Transpose(t.S, D, DvP, Dv, t.St, DP);
            for (int e = 0; e < Dv; e++) new Span<float>(t.St + e * DP + D, DP - D).Clear();
            for (int t0 = 0; t0 < N; t0 += T)
            {
                int bl = Math.Min(T, N - t0);
                int nt = t0 + T;
                var next = new NextBlockRows(nt < N ? Math.Min(T, N - nt) : 0);
                next.Add(Row(Q, N, x.H, D, b, h, nt), (long)x.H * D, D);
                next.Add(Row(G, N, x.H, Dv, b, h, nt), (long)x.H * Dv, Dv);
                next.Add(Row(K, N, x.Hk, D, b, hk, nt), (long)x.Hk * D, D);
                next.Add(Row(V, N, x.Hk, Dv, b, hk, nt), (long)x.Hk * Dv, Dv);
                next.Add(Row(DQ, N, x.H, D, b, h, nt), (long)x.H * D, D);
                next.Add(dst.K + nt * dst.KStride, dst.KStride, D);
                next.Add(dst.V + nt * dst.VStride, dst.VStride, Dv);
                LoadRows(Q, N, x.H, D, b, h, t0, bl, DP, t.Q, 0);
                LoadRows(G, N, x.H, Dv, b, h, t0, bl, DvP, t.G, 0);
                LoadRows(K, N, x.Hk, D, b, hk, t0, bl, DP, t.K, 0);
                LoadRows(V, N, x.Hk, Dv, b, hk, t0, bl, DvP, t.V, 0);
                TransposeTile(t.K, bl, DP, D, t.Kt);
                TransposeTile(t.V, bl, DvP, Dv, t.Vt);
                LowerScores(bl, D, t.Q, DP, t.Kt, t.A, t.Mask);
                LowerScores(bl, Dv, t.G, DvP, t.Vt, t.dA, t.Mask);
                next.Prefetch(0, 6);
                LowerTimes(bl, DP, t.dA, t.K, DP, t.Tmp, DP);
                next.Prefetch(1, 6);
                for (int i = 0; i < bl; i++) CpuMath.ScaleTo(t.Tmp2 + i * DvP, t.G + i * DvP, DvP, t.Pw[i + 1]);
                CpuMath.Gemm(bl, DP, Dv, t.Tmp2, 1, DvP, t.St, DP, t.Tmp, DP, true);
                next.Prefetch(2, 6);
                for (int i = 0; i < bl; i++)
                    new Span<float>(t.Tmp + i * DP, D).CopyTo(new Span<float>(DQ + (((long)b * N + t0 + i) * x.H + h) * D, D));
                UpperTransposedTimes(bl, DP, t.dA, t.Q, DP, t.Tmp, DP);
                next.Prefetch(3, 6);
                for (int j = 0; j < bl; j++) new Span<float>(t.Tmp + j * DP, D).CopyTo(new Span<float>(dst.K + (t0 + j) * dst.KStride, D));
                UpperTransposedTimes(bl, DvP, t.A, t.G, DvP, t.Tmp, DvP);
                next.Prefetch(4, 6);
                for (int j = 0; j < bl; j++) new Span<float>(t.Tmp + j * DvP, Dv).CopyTo(new Span<float>(dst.V + (t0 + j) * dst.VStride, Dv));
                // Sᵀ ← λ^bl Sᵀ + Vᵀ diag(λ^(bl−1−j)) K.
                for (int j = 0; j < bl; j++) CpuMath.Scale(t.K + j * DP, DP, t.Pw[bl - 1 - j]);
                CpuMath.Scale(t.St, Dv * DP, t.Pw[bl]);
                CpuMath.Gemm(Dv, DP, bl, t.V, DvP, 1, t.K, DP, t.St, DP, true);
                next.Prefetch(5, 6);
            }
            // Sweep 2, backwards, carrying Gs = ∂L/∂(state entering the next block): only the inter-block terms
            // are left, dk_j += λ^(bl−1−j) Gs v_j and dv_j += λ^(bl−1−j) Gsᵀ k_j.
            if (GE is null) new Span<float>(t.S, D * DvP).Clear();
            else LoadState(GE + stateOff, D, Dv, DvP, t.S);
            bool gsZero = GE is null;
            int lastStart = (N - 1) / T * T;
            for (int t0 = lastStart; t0 >= 0; t0 -= T)
            {
                int bl = Math.Min(T, N - t0);
                int nt = t0 - T;
                var next = new NextBlockRows(nt >= 0 ? T : 0);
                next.Add(Row(Q, N, x.H, D, b, h, Math.Max(nt, 0)), (long)x.H * D, D);
                next.Add(Row(G, N, x.H, Dv, b, h, Math.Max(nt, 0)), (long)x.H * Dv, Dv);
                next.Add(Row(K, N, x.Hk, D, b, hk, Math.Max(nt, 0)), (long)x.Hk * D, D);
                next.Add(Row(V, N, x.Hk, Dv, b, hk, Math.Max(nt, 0)), (long)x.Hk * Dv, Dv);
                next.Add(dst.K + Math.Max(nt, 0) * dst.KStride, dst.KStride, D);
                next.Add(dst.V + Math.Max(nt, 0) * dst.VStride, dst.VStride, Dv);
                LoadRows(Q, N, x.H, D, b, h, t0, bl, DP, t.Q, 0);
                LoadRows(G, N, x.H, Dv, b, h, t0, bl, DvP, t.G, 0);
                if (!gsZero)
                {
                    LoadRows(K, N, x.Hk, D, b, hk, t0, bl, DP, t.K, 0);
                    LoadRows(V, N, x.Hk, Dv, b, hk, t0, bl, DvP, t.V, 0);
                    Transpose(t.S, D, DvP, Dv, t.St, DP);
                    CpuMath.Gemm(bl, DP, Dv, t.V, 1, DvP, t.St, DP, t.Tmp, DP, false);
                    next.Prefetch(0, 3);
                    CpuMath.Gemm(bl, DvP, D, t.K, 1, DP, t.S, DvP, t.Tmp2, DvP, false);
                    next.Prefetch(1, 3);
                    for (int j = 0; j < bl; j++)
                    {
                        float w = t.Pw[bl - 1 - j];
                        float* dk = dst.K + (t0 + j) * dst.KStride, dv = dst.V + (t0 + j) * dst.VStride;
                        CpuMath.AddScaled(dk, dk, t.Tmp + j * DP, w, D, false);
                        CpuMath.AddScaled(dv, dv, t.Tmp2 + j * DvP, w, Dv, false);
                    }
                }
                else
                {
                    next.Prefetch(0, 3);
                    next.Prefetch(1, 3);
                }
                // Gs ← λ^bl Gs + Σ_i λ^(i+1) q_iᵀ dO_i
                for (int i = 0; i < bl; i++) CpuMath.Scale(t.Q + i * DP, DP, t.Pw[i + 1]);
                CpuMath.Scale(t.S, D * DvP, t.Pw[bl]);
                CpuMath.Gemm(D, DvP, bl, t.Q, DP, 1, t.G, DvP, t.S, DvP, true);
                next.Prefetch(2, 3);
                gsZero = false;
            }
            if (GS is not null) StoreState(t.S, D, Dv, DvP, GS + stateOff);
        });
        if (direct) return;
        // dK[b, i, hk] = Σ_g partial[b, hk·G + g, i], and the same for dV.
        int blocks = (N + T - 1) / T;
        CpuParallel.For(x.B * x.Hk * blocks, threads, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (task) =>
        {
            int blk = task % blocks, bhk = task / blocks, b = bhk / x.Hk, hk = bhk % x.Hk;
            long h0 = (long)b * x.H + (long)hk * x.Group;
            for (int i = blk * T, end = Math.Min(N, i + T); i < end; i++)
            {
                SumGroup(DK + (((long)b * N + i) * x.Hk + hk) * D, PK + (h0 * N + i) * D, (long)N * D, x.Group, D);
                SumGroup(DV + (((long)b * N + i) * x.Hk + hk) * Dv, PV + (h0 * N + i) * Dv, (long)N * Dv, x.Group, Dv);
            }
        });
    }

    /// <summary>Where one task's dK and dV rows go: row i of dK at K + i·KStride, of dV at V + i·VStride.</summary>
    private readonly struct Gradients(float* k, long kStride, float* v, long vStride)
    {
        public readonly float* K = k, V = v;
        public readonly long KStride = kStride, VStride = vStride;
    }

    /// <summary>dst[e] = Σ_g src[g·stride + e] for e &lt; n.</summary>
    private static void SumGroup(float* dst, float* src, long stride, int group, int n)
    {
        new Span<float>(src, n).CopyTo(new Span<float>(dst, n));
        for (int g = 1; g < group; g++)
        {
            float* part = src + g * stride;
            int e = 0;
            if (CpuMath.UseVector512)
                for (; e + 16 <= n; e += 16) (Vector512.Load(dst + e) + Vector512.Load(part + e)).Store(dst + e);
            else if (CpuMath.UseVector256)
                for (; e + 8 <= n; e += 8) (Vector256.Load(dst + e) + Vector256.Load(part + e)).Store(dst + e);
            for (; e < n; e++) dst[e] += part[e];
        }
    }

    private static void NonCausalBackward(float* Q, float* K, float* V, float* G, float* DQ, Gradients dst, float* GE, float* GS,
        AttentionDims x, Tiles t, int b, int h, int hk, long stateOff)
    {
        int N = x.Nq, D = x.D, Dv = x.Dv, DP = t.DP, DvP = t.DvP;
        // On entry t.S holds S0; add Kᵀ V to get the total state.
        for (int t0 = 0; t0 < N; t0 += T)
        {
            int bl = Math.Min(T, N - t0);
            LoadRows(K, N, x.Hk, D, b, hk, t0, bl, DP, t.K);
            LoadRows(V, N, x.Hk, Dv, b, hk, t0, bl, DvP, t.V);
            CpuMath.Gemm(D, DvP, bl, t.K, DP, 1, t.V, DvP, t.S, DvP, true);
        }
        // dQ = dO Sᵀ
        Transpose(t.S, D, DvP, Dv, t.St, DP);
        for (int e = 0; e < Dv; e++) new Span<float>(t.St + e * DP + D, DP - D).Clear();
        for (int t0 = 0; t0 < N; t0 += T)
        {
            int bl = Math.Min(T, N - t0);
            LoadRows(G, N, x.H, Dv, b, h, t0, bl, DvP, t.G);
            CpuMath.Gemm(bl, DP, Dv, t.G, 1, DvP, t.St, DP, t.Tmp, DP, false);
            for (int i = 0; i < bl; i++)
                new Span<float>(t.Tmp + i * DP, D).CopyTo(new Span<float>(DQ + (((long)b * N + t0 + i) * x.H + h) * D, D));
        }
        // Gs = dS_end + Qᵀ dO (the gradient of the total state, also dS0), kept in t.S.
        if (GE is null) new Span<float>(t.S, D * DvP).Clear();
        else LoadState(GE + stateOff, D, Dv, DvP, t.S);
        for (int t0 = 0; t0 < N; t0 += T)
        {
            int bl = Math.Min(T, N - t0);
            LoadRows(Q, N, x.H, D, b, h, t0, bl, DP, t.Q);
            LoadRows(G, N, x.H, Dv, b, h, t0, bl, DvP, t.G);
            CpuMath.Gemm(D, DvP, bl, t.Q, DP, 1, t.G, DvP, t.S, DvP, true);
        }
        Transpose(t.S, D, DvP, Dv, t.St, DP);
        for (int e = 0; e < Dv; e++) new Span<float>(t.St + e * DP + D, DP - D).Clear();
        for (int t0 = 0; t0 < N; t0 += T)
        {
            int bl = Math.Min(T, N - t0);
            LoadRows(K, N, x.Hk, D, b, hk, t0, bl, DP, t.K);
            LoadRows(V, N, x.Hk, Dv, b, hk, t0, bl, DvP, t.V);
            CpuMath.Gemm(bl, DP, Dv, t.V, 1, DvP, t.St, DP, t.Tmp, DP, false);
            CpuMath.Gemm(bl, DvP, D, t.K, 1, DP, t.S, DvP, t.Tmp2, DvP, false);
            for (int j = 0; j < bl; j++)
            {
                float* dk = dst.K + (t0 + j) * dst.KStride;
                float* dv = dst.V + (t0 + j) * dst.VStride;
                for (int d = 0; d < D; d++) dk[d] += t.Tmp[j * DP + d];
                for (int e = 0; e < Dv; e++) dv[e] += t.Tmp2[j * DvP + e];
            }
        }
        if (GS is not null) StoreState(t.S, D, Dv, DvP, GS + stateOff);
    }

    /// <summary>M = Σ_j λ^(N−1−j) k_jᵀ v_j per (batch, head).</summary>
    public static void ChunkState(CpuTensor k, CpuTensor v, float[] decay, bool causal, CpuTensor m, AttentionDims x, int threads)
    {
        float* K = k.Pointer, V = v.Pointer, M = m.Pointer;
        int N = x.Nk;
        CpuParallel.For(x.B * x.H, threads, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (bh) =>
        {
            int b = bh / x.H, h = bh % x.H, hk = h / x.Group;
            var t = new Tiles(x.D, x.Dv);
            t.Powers(causal ? decay[h] : 1f);
            new Span<float>(t.S, x.D * t.DvP).Clear();
            for (int t0 = 0; t0 < N; t0 += T)
            {
                int bl = Math.Min(T, N - t0);
                LoadRows(K, N, x.Hk, x.D, b, hk, t0, bl, t.DP, t.K);
                LoadRows(V, N, x.Hk, x.Dv, b, hk, t0, bl, t.DvP, t.V);
                for (int j = 0; j < bl; j++) CpuMath.Scale(t.K + j * t.DP, t.DP, t.Pw[bl - 1 - j]);
                CpuMath.Scale(t.S, x.D * t.DvP, t.Pw[bl]);
                CpuMath.Gemm(x.D, t.DvP, bl, t.K, t.DP, 1, t.V, t.DvP, t.S, t.DvP, true);
            }
            StoreState(t.S, x.D, x.Dv, t.DvP, M + (long)bh * x.D * x.Dv);
        });
    }

    /// <summary>dM = Σ_i λ^(i+1) q_iᵀ dO_i per (batch, head).</summary>
    public static void ChunkStateBackward(CpuTensor q, CpuTensor dO, float[] decay, bool causal, CpuTensor dM, int b_, int n, int heads, int d, int dv, int threads)
    {
        float* Q = q.Pointer, G = dO.Pointer, M = dM.Pointer;
        CpuParallel.For(b_ * heads, threads, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (bh) =>
        {
            int b = bh / heads, h = bh % heads;
            var t = new Tiles(d, dv);
            double ln = Math.Log(causal ? decay[h] : 1f);
            new Span<float>(t.S, d * t.DvP).Clear();
            for (int t0 = 0; t0 < n; t0 += T)
            {
                int bl = Math.Min(T, n - t0);
                LoadRows(Q, n, heads, d, b, h, t0, bl, t.DP, t.Q);
                LoadRows(G, n, heads, dv, b, h, t0, bl, t.DvP, t.G);
                for (int i = 0; i < bl; i++) CpuMath.Scale(t.Q + i * t.DP, t.DP, Power((t0 + i + 1) * ln));
                CpuMath.Gemm(d, t.DvP, bl, t.Q, t.DP, 1, t.G, t.DvP, t.S, t.DvP, true);
            }
            StoreState(t.S, d, dv, t.DvP, M + (long)bh * d * dv);
        });
    }
}
