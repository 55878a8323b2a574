using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace Distributed.Kernels.Cpu;

/// <summary>
/// The two primitives every CPU kernel is built from: a register-blocked small GEMM and a vectorised
/// base-2 exponential. AVX-512 (<see cref="Vector512"/>) when the hardware has it, else AVX2
/// (<see cref="Vector256"/>), else a plain scalar path that computes the same thing (slower, never wrong).
/// </summary>
internal static unsafe class CpuMath
{
    /// <summary>Floats per vector of the fast path.</summary>
    public const int Lanes = 16;

    /// <summary>Whether the AVX-512 path runs. Tests may turn it off to exercise the other paths.</summary>
    public static bool UseVector512 { get; set; } = Vector512.IsHardwareAccelerated;

    /// <summary>Whether the AVX2 path runs when AVX-512 does not. Tests may turn it off.</summary>
    public static bool UseVector256 { get; set; } = Vector256.IsHardwareAccelerated;

    /// <summary>Which path runs now: "avx512", "avx2" or "scalar".</summary>
    public static string PathName => UseVector512 ? "avx512" : UseVector256 ? "avx2" : "scalar";

    /// <summary>Rounds up to a multiple of <see cref="Lanes"/>.</summary>
    public static int Pad(int n) => (n + Lanes - 1) / Lanes * Lanes;

    /// <summary>
    /// <c>C[m, n] (+)= Σ_k A(k, m) · B[k, n]</c> for m &lt; M, n &lt; N, k &lt; K, where
    /// <c>A(k, m) = a[k·aStrideK + m·aStrideM]</c> (any layout), B rows are contiguous with stride
    /// <paramref name="ldb"/>, C rows with stride <paramref name="ldc"/>. N must be a multiple of 16.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Gemm(int M, int N, int K, float* a, int aStrideK, int aStrideM, float* b, int ldb, float* c, int ldc, bool accumulate)
    {
        if (M <= 0 || N <= 0) return;
        if (!UseVector512)
        {
            if (UseVector256) Gemm256(M, N, K, a, aStrideK, aStrideM, b, ldb, c, ldc, accumulate);
            else GemmScalar(M, N, K, a, aStrideK, aStrideM, b, ldb, c, ldc, accumulate);
            return;
        }
        int m = 0;
        for (; m + 4 <= M; m += 4)
        {
            int n = 0;
            for (; n + 64 <= N; n += 64) Block4x4(K, a + m * aStrideM, aStrideK, aStrideM, b + n, ldb, c + m * ldc + n, ldc, accumulate);
            for (; n < N; n += 16) Block4x1(K, a + m * aStrideM, aStrideK, aStrideM, b + n, ldb, c + m * ldc + n, ldc, accumulate);
        }
        for (; m < M; m++)
        {
            int n = 0;
            for (; n + 64 <= N; n += 64) Block1x4(K, a + m * aStrideM, aStrideK, b + n, ldb, c + m * ldc + n, accumulate);
            for (; n < N; n += 16) Block1x1(K, a + m * aStrideM, aStrideK, b + n, ldb, c + m * ldc + n, accumulate);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Block4x4(int K, float* a, int sk, int sm, float* b, int ldb, float* c, int ldc, bool acc)
    {
        Vector512<float> c00 = default, c01 = default, c02 = default, c03 = default;
        Vector512<float> c10 = default, c11 = default, c12 = default, c13 = default;
        Vector512<float> c20 = default, c21 = default, c22 = default, c23 = default;
        Vector512<float> c30 = default, c31 = default, c32 = default, c33 = default;
        float* a0 = a, a1 = a + sm, a2 = a + 2 * sm, a3 = a + 3 * sm;
        for (int k = 0; k < K; k++)
        {
            float* bk = b + (long)k * ldb;
            var b0 = Vector512.Load(bk);
            var b1 = Vector512.Load(bk + 16);
            var b2 = Vector512.Load(bk + 32);
            var b3 = Vector512.Load(bk + 48);
            long ko = (long)k * sk;
            var x = Vector512.Create(a0[ko]);
            c00 = Vector512.FusedMultiplyAdd(x, b0, c00); c01 = Vector512.FusedMultiplyAdd(x, b1, c01);
            c02 = Vector512.FusedMultiplyAdd(x, b2, c02); c03 = Vector512.FusedMultiplyAdd(x, b3, c03);
            x = Vector512.Create(a1[ko]);
            c10 = Vector512.FusedMultiplyAdd(x, b0, c10); c11 = Vector512.FusedMultiplyAdd(x, b1, c11);
            c12 = Vector512.FusedMultiplyAdd(x, b2, c12); c13 = Vector512.FusedMultiplyAdd(x, b3, c13);
            x = Vector512.Create(a2[ko]);
            c20 = Vector512.FusedMultiplyAdd(x, b0, c20); c21 = Vector512.FusedMultiplyAdd(x, b1, c21);
            c22 = Vector512.FusedMultiplyAdd(x, b2, c22); c23 = Vector512.FusedMultiplyAdd(x, b3, c23);
            x = Vector512.Create(a3[ko]);
            c30 = Vector512.FusedMultiplyAdd(x, b0, c30); c31 = Vector512.FusedMultiplyAdd(x, b1, c31);
            c32 = Vector512.FusedMultiplyAdd(x, b2, c32); c33 = Vector512.FusedMultiplyAdd(x, b3, c33);
        }
        Store(c, c00, acc); Store(c + 16, c01, acc); Store(c + 32, c02, acc); Store(c + 48, c03, acc);
        c += ldc;
        Store(c, c10, acc); Store(c + 16, c11, acc); Store(c + 32, c12, acc); Store(c + 48, c13, acc);
        c += ldc;
        Store(c, c20, acc); Store(c + 16, c21, acc); Store(c + 32, c22, acc); Store(c + 48, c23, acc);
        c += ldc;
        Store(c, c30, acc); Store(c + 16, c31, acc); Store(c + 32, c32, acc); Store(c + 48, c33, acc);
    }

    private static void Block4x1(int K, float* a, int sk, int sm, float* b, int ldb, float* c, int ldc, bool acc)
    {
        Vector512<float> c0 = default, c1 = default, c2 = default, c3 = default;
        for (int k = 0; k < K; k++)
        {
            var bk = Vector512.Load(b + (long)k * ldb);
            long ko = (long)k * sk;
            c0 = Vector512.FusedMultiplyAdd(Vector512.Create(a[ko]), bk, c0);
            c1 = Vector512.FusedMultiplyAdd(Vector512.Create(a[ko + sm]), bk, c1);
            c2 = Vector512.FusedMultiplyAdd(Vector512.Create(a[ko + 2 * sm]), bk, c2);
            c3 = Vector512.FusedMultiplyAdd(Vector512.Create(a[ko + 3 * sm]), bk, c3);
        }
        Store(c, c0, acc); Store(c + ldc, c1, acc); Store(c + 2 * ldc, c2, acc); Store(c + 3 * ldc, c3, acc);
    }

    private static void Block1x4(int K, float* a, int sk, float* b, int ldb, float* c, bool acc)
    {
        Vector512<float> c0 = default, c1 = default, c2 = default, c3 = default;
        for (int k = 0; k < K; k++)
        {
            float* bk = b + (long)k * ldb;
            var x = Vector512.Create(a[(long)k * sk]);
            c0 = Vector512.FusedMultiplyAdd(x, Vector512.Load(bk), c0);
            c1 = Vector512.FusedMultiplyAdd(x, Vector512.Load(bk + 16), c1);
            c2 = Vector512.FusedMultiplyAdd(x, Vector512.Load(bk + 32), c2);
            c3 = Vector512.FusedMultiplyAdd(x, Vector512.Load(bk + 48), c3);
        }
        Store(c, c0, acc); Store(c + 16, c1, acc); Store(c + 32, c2, acc); Store(c + 48, c3, acc);
    }

    private static void Block1x1(int K, float* a, int sk, float* b, int ldb, float* c, bool acc)
    {
        Vector512<float> c0 = default;
        for (int k = 0; k < K; k++)
            c0 = Vector512.FusedMultiplyAdd(Vector512.Create(a[(long)k * sk]), Vector512.Load(b + (long)k * ldb), c0);
        Store(c, c0, acc);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Store(float* c, Vector512<float> v, bool acc)
    {
        if (acc) v += Vector512.Load(c);
        v.Store(c);
    }

    /// <summary>AVX2: 4 rows × 16 columns per block (8 accumulators of 16 ymm registers).</summary>
    private static void Gemm256(int M, int N, int K, float* a, int sk, int sm, float* b, int ldb, float* c, int ldc, bool acc)
    {
        int m = 0;
        for (; m + 4 <= M; m += 4)
            for (int n = 0; n < N; n += 16) Block256x4(K, a + m * sm, sk, sm, b + n, ldb, c + m * ldc + n, ldc, acc);
        for (; m < M; m++)
            for (int n = 0; n < N; n += 16) Block256x1(K, a + m * sm, sk, b + n, ldb, c + m * ldc + n, acc);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Block256x4(int K, float* a, int sk, int sm, float* b, int ldb, float* c, int ldc, bool acc)
    {
        Vector256<float> c00 = default, c01 = default, c10 = default, c11 = default;
        Vector256<float> c20 = default, c21 = default, c30 = default, c31 = default;
        float* a0 = a, a1 = a + sm, a2 = a + 2 * sm, a3 = a + 3 * sm;
        for (int k = 0; k < K; k++)
        {
            float* bk = b + (long)k * ldb;
            var b0 = Vector256.Load(bk);
            var b1 = Vector256.Load(bk + 8);
            long ko = (long)k * sk;
            var x = Vector256.Create(a0[ko]);
            c00 = Vector256.FusedMultiplyAdd(x, b0, c00); c01 = Vector256.FusedMultiplyAdd(x, b1, c01);
            x = Vector256.Create(a1[ko]);
            c10 = Vector256.FusedMultiplyAdd(x, b0, c10); c11 = Vector256.FusedMultiplyAdd(x, b1, c11);
            x = Vector256.Create(a2[ko]);
            c20 = Vector256.FusedMultiplyAdd(x, b0, c20); c21 = Vector256.FusedMultiplyAdd(x, b1, c21);
            x = Vector256.Create(a3[ko]);
            c30 = Vector256.FusedMultiplyAdd(x, b0, c30); c31 = Vector256.FusedMultiplyAdd(x, b1, c31);
        }
        Store(c, c00, acc); Store(c + 8, c01, acc); c += ldc;
        Store(c, c10, acc); Store(c + 8, c11, acc); c += ldc;
        Store(c, c20, acc); Store(c + 8, c21, acc); c += ldc;
        Store(c, c30, acc); Store(c + 8, c31, acc);
    }

    private static void Block256x1(int K, float* a, int sk, float* b, int ldb, float* c, bool acc)
    {
        Vector256<float> c0 = default, c1 = default;
        for (int k = 0; k < K; k++)
        {
            float* bk = b + (long)k * ldb;
            var x = Vector256.Create(a[(long)k * sk]);
            c0 = Vector256.FusedMultiplyAdd(x, Vector256.Load(bk), c0);
            c1 = Vector256.FusedMultiplyAdd(x, Vector256.Load(bk + 8), c1);
        }
        Store(c, c0, acc); Store(c + 8, c1, acc);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Store(float* c, Vector256<float> v, bool acc)
    {
        if (acc) v += Vector256.Load(c);
        v.Store(c);
    }

    private static void GemmScalar(int M, int N, int K, float* a, int sk, int sm, float* b, int ldb, float* c, int ldc, bool acc)
    {
        for (int m = 0; m < M; m++)
        {
            float* crow = c + (long)m * ldc;
            if (!acc) new Span<float>(crow, N).Clear();
            for (int k = 0; k < K; k++)
            {
                float x = a[(long)k * sk + (long)m * sm];
                if (x == 0f) continue;
                float* brow = b + (long)k * ldb;
                for (int n = 0; n < N; n++) crow[n] += x * brow[n];
            }
        }
    }

    /// <summary>2^f for f in [-0.5, 0.5]: Taylor series of e^(f ln 2) to degree 6, error ≤ (0.5 ln 2)^7 / 7! ≈ 1.2e-7.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Exp2Polynomial(Vector512<float> f)
    {
        var p = Vector512.Create(1.5403530393381606e-4f);
        p = Vector512.FusedMultiplyAdd(p, f, Vector512.Create(1.3333558146428443e-3f));
        p = Vector512.FusedMultiplyAdd(p, f, Vector512.Create(9.6181291076284772e-3f));
        p = Vector512.FusedMultiplyAdd(p, f, Vector512.Create(5.5504108664821580e-2f));
        p = Vector512.FusedMultiplyAdd(p, f, Vector512.Create(0.24022650695910071f));
        p = Vector512.FusedMultiplyAdd(p, f, Vector512.Create(0.69314718055994531f));
        p = Vector512.FusedMultiplyAdd(p, f, Vector512<float>.One);
        return p;
    }

    /// <summary>2^x for 16 lanes; lanes below -126 (including -inf) give exactly 0. Relative error ≈ 2e-7.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Exp2(Vector512<float> x)
    {
        var underflow = Vector512.LessThan(x, Vector512.Create(-126f));
        x = Vector512.Min(Vector512.Max(x, Vector512.Create(-126f)), Vector512.Create(127f));
        var n = Vector512.Round(x);
        var f = x - n; // [-0.5, 0.5]
        var p = Exp2Polynomial(f);
        var bits = (Vector512.ConvertToInt32(n) + Vector512.Create(127)) << 23;
        var r = p * bits.AsSingle();
        return Vector512.ConditionalSelect(underflow.AsInt32(), Vector512<int>.Zero, r.AsInt32()).AsSingle();
    }

    /// <summary>
    /// 2^x for 16 lanes where no lane is masked: the same polynomial as <see cref="Exp2(Vector512{float})"/>, with
    /// the exponent applied by <c>vscalefps</c> and no select. Lanes below −126 give 2^−126 times the
    /// polynomial (about 1e-38) instead of exactly 0: only for the unmasked keys of a softmax row, where the
    /// row's largest term is 1, so the difference is far below fp32 resolution. Masked keys must use
    /// <see cref="Exp2(Vector512{float})"/>, which gives exactly 0.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Exp2Unmasked(Vector512<float> x)
    {
        x = Vector512.MaxNative(x, Vector512.Create(-126f));
        var n = Vector512.Round(x);
        var f = x - n;
        var p = Exp2Polynomial(f);
        return Avx512F.Scale(p, n);
    }

    /// <summary>The largest of 16 lanes (NaN if any lane is NaN), by halving instead of 16 element reads.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float HorizontalMax(Vector512<float> v)
    {
        var a = Vector256.Max(v.GetLower(), v.GetUpper());
        var b = Vector128.Max(a.GetLower(), a.GetUpper());
        b = Vector128.Max(b, Vector128.Shuffle(b, Vector128.Create(2, 3, 0, 1)));
        b = Vector128.Max(b, Vector128.Shuffle(b, Vector128.Create(1, 0, 3, 2)));
        return b.ToScalar();
    }

    /// <summary>2^x for 8 lanes (AVX2); same polynomial and zero below -126 as the 16-lane version.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Exp2(Vector256<float> x)
    {
        var underflow = Vector256.LessThan(x, Vector256.Create(-126f));
        x = Vector256.Min(Vector256.Max(x, Vector256.Create(-126f)), Vector256.Create(127f));
        var n = Vector256.Round(x);
        var f = x - n;
        var p = Vector256.Create(1.5403530393381606e-4f);
        p = Vector256.FusedMultiplyAdd(p, f, Vector256.Create(1.3333558146428443e-3f));
        p = Vector256.FusedMultiplyAdd(p, f, Vector256.Create(9.6181291076284772e-3f));
        p = Vector256.FusedMultiplyAdd(p, f, Vector256.Create(5.5504108664821580e-2f));
        p = Vector256.FusedMultiplyAdd(p, f, Vector256.Create(0.24022650695910071f));
        p = Vector256.FusedMultiplyAdd(p, f, Vector256.Create(0.69314718055994531f));
        p = Vector256.FusedMultiplyAdd(p, f, Vector256<float>.One);
        var bits = (Vector256.ConvertToInt32(n) + Vector256.Create(127)) << 23;
        var r = p * bits.AsSingle();
        return Vector256.ConditionalSelect(underflow.AsInt32(), Vector256<int>.Zero, r.AsInt32()).AsSingle();
    }

    /// <summary>Scalar 2^x with the same zero below -126.</summary>
    public static float Exp2(float x) => x < -126f ? 0f : MathF.Pow(2f, x);

    /// <summary>y[i] *= x[i] over n elements.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Multiply(float* y, float* x, int n)
    {
        int i = 0;
        if (UseVector512)
            for (; i + 16 <= n; i += 16) (Vector512.Load(y + i) * Vector512.Load(x + i)).Store(y + i);
        else if (UseVector256)
            for (; i + 8 <= n; i += 8) (Vector256.Load(y + i) * Vector256.Load(x + i)).Store(y + i);
        for (; i < n; i++) y[i] *= x[i];
    }

    /// <summary>dst[i] = a[i] + w·b[i] over n elements, or dst[i] += that when <paramref name="accumulate"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void AddScaled(float* dst, float* a, float* b, float w, int n, bool accumulate)
    {
        int i = 0;
        if (UseVector512)
        {
            var wv = Vector512.Create(w);
            for (; i + 16 <= n; i += 16)
            {
                var r = Vector512.FusedMultiplyAdd(Vector512.Load(b + i), wv, Vector512.Load(a + i));
                if (accumulate) r += Vector512.Load(dst + i);
                r.Store(dst + i);
            }
        }
        else if (UseVector256)
        {
            var wv = Vector256.Create(w);
            for (; i + 8 <= n; i += 8)
            {
                var r = Vector256.FusedMultiplyAdd(Vector256.Load(b + i), wv, Vector256.Load(a + i));
                if (accumulate) r += Vector256.Load(dst + i);
                r.Store(dst + i);
            }
        }
        for (; i < n; i++) dst[i] = (accumulate ? dst[i] : 0f) + (a[i] + w * b[i]);
    }

    /// <summary>
    /// dst[c·ldDst + r] = src[r·ld + c] for one 16×16 block, in AVX-512 registers: 32-bit and 64-bit
    /// interleaves within 128-bit lanes, then two rounds of 128-bit lane shuffles (64 shuffles for 256 floats).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Transpose16x16(float* src, int ld, float* dst, int ldDst)
    {
        var r = stackalloc Vector512<float>[16];
        var t = stackalloc Vector512<float>[16];
        for (int i = 0; i < 16; i++) r[i] = Vector512.Load(src + (long)i * ld);
        // Rows i and i+1, 32-bit interleave: lane L of t[i] is (r_i[4L], r_i+1[4L], r_i[4L+1], r_i+1[4L+1]).
        for (int i = 0; i < 16; i += 2)
        {
            t[i] = Avx512F.UnpackLow(r[i], r[i + 1]);
            t[i + 1] = Avx512F.UnpackHigh(r[i], r[i + 1]);
        }
        // 64-bit interleave: lane L of r[4g + j] is column 4L + j of rows 4g .. 4g+3.
        for (int i = 0; i < 16; i += 4)
        {
            r[i] = Avx512F.UnpackLow(t[i].AsDouble(), t[i + 2].AsDouble()).AsSingle();
            r[i + 1] = Avx512F.UnpackHigh(t[i].AsDouble(), t[i + 2].AsDouble()).AsSingle();
            r[i + 2] = Avx512F.UnpackLow(t[i + 1].AsDouble(), t[i + 3].AsDouble()).AsSingle();
            r[i + 3] = Avx512F.UnpackHigh(t[i + 1].AsDouble(), t[i + 3].AsDouble()).AsSingle();
        }
        // Output row 4L + j is lane L of r[j], r[4+j], r[8+j], r[12+j].
        for (int j = 0; j < 4; j++)
        {
            Vector512<float> a = r[j], b = r[4 + j], c = r[8 + j], d = r[12 + j];
            var ab01 = Avx512F.Shuffle4x128(a, b, 0b01_00_01_00); // a0 a1 b0 b1
            var ab23 = Avx512F.Shuffle4x128(a, b, 0b11_10_11_10); // a2 a3 b2 b3
            var cd01 = Avx512F.Shuffle4x128(c, d, 0b01_00_01_00);
            var cd23 = Avx512F.Shuffle4x128(c, d, 0b11_10_11_10);
            Avx512F.Shuffle4x128(ab01, cd01, 0b10_00_10_00).Store(dst + (long)j * ldDst);        // a0 b0 c0 d0
            Avx512F.Shuffle4x128(ab01, cd01, 0b11_01_11_01).Store(dst + (long)(4 + j) * ldDst);  // a1 b1 c1 d1
            Avx512F.Shuffle4x128(ab23, cd23, 0b10_00_10_00).Store(dst + (long)(8 + j) * ldDst);
            Avx512F.Shuffle4x128(ab23, cd23, 0b11_01_11_01).Store(dst + (long)(12 + j) * ldDst);
        }
    }

    /// <summary>dst[i] = s·src[i] over n elements.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void ScaleTo(float* dst, float* src, int n, float s)
    {
        int i = 0;
        if (UseVector512)
        {
            var v = Vector512.Create(s);
            for (; i + 16 <= n; i += 16) (Vector512.Load(src + i) * v).Store(dst + i);
        }
        else if (UseVector256)
        {
            var v = Vector256.Create(s);
            for (; i + 8 <= n; i += 8) (Vector256.Load(src + i) * v).Store(dst + i);
        }
        for (; i < n; i++) dst[i] = src[i] * s;
    }

    /// <summary>y[i] *= s over n elements.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Scale(float* y, int n, float s) => ScaleTo(y, y, n, s);
}
