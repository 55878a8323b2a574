using Distributed.Kernels;
using Distributed.Kernels.Cpu;
using Distributed.Reference;
using Xunit;
using Xunit.Abstractions;
using Dims = Distributed.Reference.ReferenceAttention.Dims;

namespace Distributed.Tests.Reliability;

/// <summary>
/// Numerics where fp32 is stressed: lightning LASP-2 over a million tokens (the state is summed over 2^20 tokens and
/// passed across ranks), softmax with logits of ±1e4 and with rows that see no key, and the error at P = 8 against
/// P = 1 at a length where every rank holds several 64-row tiles.
/// </summary>
public sealed class NumericsAtLengthTests(ITestOutputHelper output)
{
    /// <summary>
    /// LASP-2, N = 1,048,576, P = 4 in-process, H = 1, D = Dv = 8, causal. λ = 0.99999 keeps e^-2.6 of a state
    /// after the 262,144 tokens of one rank's share, so the exchange across ranks is tested; λ = 1 sums all 2^20
    /// tokens; λ = 0.5 forgets within a block. Checked on sampled rows (every shard edge and 64 spread rows) against an
    /// independent fp64 recurrence in this test: S_i = λ S_{i−1} + k_iᵀ v_i, o_i = q_i S_i; and backwards
    /// R_i = λ R_{i+1} + q_iᵀ dO_i, dq_i = dO_i S_iᵀ, dk_i = R_i v_iᵀ, dv_i = k_i R_i.
    /// </summary>
    [Theory]
    [InlineData(0.5f)]
    [InlineData(0.99999f)]
    [InlineData(1f)]
    public void Lasp2_MillionTokens_FiniteAndWithin1e4OfFp64(float lambda)
    {
        const int N = 1 << 20, P = 4, D = 8, Dv = 8;
        var shape = new AttentionShape(1, N, 1, 1, D, Dv);
        var c = new SchemeCase($"lasp2 λ={lambda}", shape, new SequenceParallelOptions { Attention = AttentionKind.Lightning, Scheme = ParallelScheme.Lasp2, Causal = true, Decay = [lambda] });
        // k is scaled down so that at λ = 1 the state (a sum of 2^20 terms) stays of order 1e2, as in the scheme tests.
        var x = GlobalInputs.Random(shape, 11, 1f, 0.25f);
        var got = SchemeRun.Run(c, P, x);

        var rows = SampledRows(N, P);
        var (o, dq, dk, dv) = LightningRecurrence(x, N, D, Dv, lambda, rows);
        double eo = RowError(got.O, o, rows, Dv), eq = RowError(got.DQ, dq, rows, D), ek = RowError(got.DK, dk, rows, D), ev = RowError(got.DV, dv, rows, Dv);
        output.WriteLine($"λ = {lambda}: N = {N}, P = {P}, {rows.Length} sampled rows; max relative error O {eo:E2}, dQ {eq:E2}, dK {ek:E2}, dV {ev:E2}");
        foreach (var (name, a) in new[] { ("O", got.O), ("dQ", got.DQ), ("dK", got.DK), ("dV", got.DV) })
            Assert.True(a.All(float.IsFinite), $"{name} holds NaN or Inf");
        Assert.True(Math.Max(Math.Max(eo, eq), Math.Max(ek, ev)) <= 1e-4, $"λ = {lambda}: O {eo:E2}, dQ {eq:E2}, dK {ek:E2}, dV {ev:E2} > 1e-4");
    }

    /// <summary>First and last token of every zigzag chunk, plus 64 rows spread over the sequence.</summary>
    private static int[] SampledRows(int n, int ranks)
    {
        var rows = new SortedSet<int>();
        int chunks = 2 * ranks;
        for (int g = 0; g < chunks; g++)
        {
            var (start, count) = Sharding.Chunk(n, chunks, g);
            rows.Add(start);
            rows.Add(start + count - 1);
        }
        var rng = new Random(5);
        for (int i = 0; i < 64; i++) rows.Add(rng.Next(n));
        return [.. rows];
    }

    private static (double[] O, double[] DQ, double[] DK, double[] DV) LightningRecurrence(GlobalInputs x, int n, int d, int dv, double lambda, int[] rows)
    {
        var o = new double[rows.Length * dv];
        var dq = new double[rows.Length * d];
        var dk = new double[rows.Length * d];
        var dvOut = new double[rows.Length * dv];
        var s = new double[d * dv];
        int next = 0;
        for (int i = 0; i < n; i++)
        {
            for (int a = 0; a < d * dv; a++) s[a] *= lambda;
            for (int a = 0; a < d; a++)
            {
                double ka = x.K[(long)i * d + a];
                for (int e = 0; e < dv; e++) s[a * dv + e] += ka * x.V[(long)i * dv + e];
            }
            if (next < rows.Length && rows[next] == i)
            {
                for (int e = 0; e < dv; e++)
                {
                    double sum = 0;
                    for (int a = 0; a < d; a++) sum += x.Q[(long)i * d + a] * s[a * dv + e];
                    o[next * dv + e] = sum;
                }
                for (int a = 0; a < d; a++)
                {
                    double sum = 0;
                    for (int e = 0; e < dv; e++) sum += x.DO[(long)i * dv + e] * s[a * dv + e];
                    dq[next * d + a] = sum;
                }
                next++;
            }
        }
        var r = new double[d * dv];
        next = rows.Length - 1;
        for (int i = n - 1; i >= 0; i--)
        {
            for (int a = 0; a < d * dv; a++) r[a] *= lambda;
            for (int a = 0; a < d; a++)
            {
                double qa = x.Q[(long)i * d + a];
                for (int e = 0; e < dv; e++) r[a * dv + e] += qa * x.DO[(long)i * dv + e];
            }
            if (next >= 0 && rows[next] == i)
            {
                for (int a = 0; a < d; a++)
                {
                    double sum = 0;
                    for (int e = 0; e < dv; e++) sum += r[a * dv + e] * x.V[(long)i * dv + e];
                    dk[next * d + a] = sum;
                }
                for (int e = 0; e < dv; e++)
                {
                    double sum = 0;
                    for (int a = 0; a < d; a++) sum += x.K[(long)i * d + a] * r[a * dv + e];
                    dvOut[next * dv + e] = sum;
                }
                next--;
            }
        }
        return (o, dq, dk, dvOut);
    }

    /// <summary>max |got − ref| / max |ref| over the sampled rows (H = 1: a row is <paramref name="width"/> values).</summary>
    private static double RowError(float[] got, double[] expected, int[] rows, int width)
    {
        double maxErr = 0, maxRef = 0;
        for (int r = 0; r < rows.Length; r++)
            for (int e = 0; e < width; e++)
            {
                double g = got[(long)rows[r] * width + e], x = expected[r * width + e];
                if (!double.IsFinite(g)) return double.PositiveInfinity;
                maxErr = Math.Max(maxErr, Math.Abs(g - x));
                maxRef = Math.Max(maxRef, Math.Abs(x));
            }
        return maxErr / Math.Max(maxRef, 1e-30);
    }

    public static TheoryData<string> Backends() => ["cpu", "ilgpu-cpu"];

    /// <summary>
    /// Logits reaching ±1e4: q and k hold integers in [-40, 40] (q·k exact in fp32, max |q·k| ≥ 1e4 asserted) and the scale is 1, so the
    /// softmax is nearly one-hot with exp() far outside fp32's range before the max is subtracted. Outputs and
    /// gradients must be finite and match fp64 within 1e-2, not 1e-4: fp32 holds a logit of 1e4 (times log2 e, as
    /// exp2-based kernels use it) only to its ulp, 2^-10 ≈ 1e-3, so the weight of a near-tied key is uncertain by about
    /// that much per rounding, and the gradients' dP − Drow cancels to a small difference of such weights. What this
    /// test catches is of order 1: an overflow to Inf, a NaN, a lost max subtraction or a wrong merge of two ±1e4 LSEs.
    /// </summary>
    [Theory]
    [MemberData(nameof(Backends))]
    public void Softmax_LogitsOf1e4_FiniteAndMatchFp64(string backendName)
    {
        const int B = 1, N = 160, H = 2, Hk = 1, D = 16, Dv = 16;
        var shape = new AttentionShape(B, N, H, Hk, D, Dv);
        var rng = new Random(17);
        var x = GlobalInputs.Random(shape, 3);
        for (int i = 0; i < x.Q.Length; i++) x.Q[i] = rng.Next(-40, 41);
        for (int i = 0; i < x.K.Length; i++) x.K[i] = rng.Next(-40, 41);
        var dims = new Dims(B, N, N, H, Hk, D, Dv);
        double[] Wide(float[] a) => [.. a.Select(f => (double)f)];
        var (q, k, v, dO) = (Wide(x.Q), Wide(x.K), Wide(x.V), Wide(x.DO));
        double maxLogit = 0;
        for (int i = 0; i < N; i++)
            for (int j = 0; j <= i; j++)
            {
                double dot = 0;
                for (int a = 0; a < D; a++) dot += q[i * H * D + a] * k[j * Hk * D + a];
                maxLogit = Math.Max(maxLogit, Math.Abs(dot));
            }
        Assert.True(maxLogit >= 1e4, $"the inputs reach logits of only {maxLogit}");
        var o = ReferenceAttention.FlashForward(q, k, v, dims, 0, 0, true, 1).O;
        var (dq, dk, dv) = ReferenceAttention.FlashBackward(q, k, v, dO, dims, 0, 0, true, 1);
        // One backend per rank for every scheme: ILGPU compiles its kernels once per backend.
        var backends = new[] { KernelBackends.Create(backendName, 0, 1), KernelBackends.Create(backendName, 0, 1) };
        using var release = new Disposables(backends);
        foreach (var scheme in new[] { ParallelScheme.AllGather, ParallelScheme.Ring, ParallelScheme.Partial, ParallelScheme.Ulysses })
        {
            var c = new SchemeCase(scheme.ToString(), shape, new SequenceParallelOptions { Attention = AttentionKind.Softmax, Scheme = scheme, Causal = true, Scale = 1 });
            var got = SchemeRun.Run(c, x, backends);
            foreach (var (name, a) in new[] { ("O", got.O), ("dQ", got.DQ), ("dK", got.DK), ("dV", got.DV) })
                Assert.True(a.All(float.IsFinite), $"{scheme}: {name} holds NaN or Inf");
            double[] e = [ReferenceAttention.RelativeError(got.O, o), ReferenceAttention.RelativeError(got.DQ, dq), ReferenceAttention.RelativeError(got.DK, dk), ReferenceAttention.RelativeError(got.DV, dv)];
            output.WriteLine($"{backendName} {scheme}: max |logit| {maxLogit:F0}, relative error O {e[0]:E2}, dQ {e[1]:E2}, dK {e[2]:E2}, dV {e[3]:E2}");
            // The forward is well conditioned (weights of near-tied keys sum to what fp64 gives): O within 1e-5.
            Assert.True(e[0] <= 1e-5, $"{scheme}: O {e[0]:E2}");
            Assert.True(e.Max() <= 1e-2, $"{scheme}: {e.Max():E2}");
        }
    }

    /// <summary>
    /// Rows that see no key (a causal block whose keys all come after its queries: query offset 0, key offset 24, so
    /// the first 24 of 40 rows are fully masked): O = 0, LSE = −∞, zero gradients from those rows, and every value finite
    /// except that LSE. The other rows match fp64.
    /// </summary>
    [Theory]
    [MemberData(nameof(Backends))]
    public void Softmax_FullyMaskedRows_ZeroOutputMinusInfLseFiniteGradients(string backendName)
    {
        const int B = 1, Nq = 40, Nk = 32, H = 2, Hk = 1, D = 16, Dv = 8;
        const long QOffset = 0, KOffset = 24;
        var dims = new Dims(B, Nq, Nk, H, Hk, D, Dv);
        var q = ReferenceAttention.Random((long)B * Nq * H * D, 31);
        var k = ReferenceAttention.Random((long)B * Nk * Hk * D, 32);
        var v = ReferenceAttention.Random((long)B * Nk * Hk * Dv, 33);
        var dO = ReferenceAttention.Random((long)B * Nq * H * Dv, 34);
        double scale = 1 / Math.Sqrt(D);
        var (oRef, lseRef) = ReferenceAttention.FlashForward(q, k, v, dims, QOffset, KOffset, true, scale);
        var (dqRef, dkRef, dvRef) = ReferenceAttention.FlashBackward(q, k, v, dO, dims, QOffset, KOffset, true, scale);

        using var backend = KernelBackends.Create(backendName, 0, 1);
        DeviceTensor Put(double[] a, params int[] shape)
        {
            var t = backend.Allocate(shape);
            t.CopyFromHost([.. a.Select(d => (float)d)]);
            return t;
        }
        float[] Get(DeviceTensor t)
        {
            var a = new float[t.Length];
            t.CopyToHost(a);
            return a;
        }
        using var tq = Put(q, B, Nq, H, D);
        using var tk = Put(k, B, Nk, Hk, D);
        using var tv = Put(v, B, Nk, Hk, Dv);
        using var tdo = Put(dO, B, Nq, H, Dv);
        using var to = backend.Allocate(B, Nq, H, Dv);
        using var lse = backend.Allocate(B, H, Nq);
        using var drow = backend.Allocate(B, H, Nq);
        using var dq = backend.Allocate(B, Nq, H, D);
        using var dk = backend.Allocate(B, Nk, Hk, D);
        using var dv = backend.Allocate(B, Nk, Hk, Dv);
        var options = new FlashOptions(QOffset, KOffset, true, (float)scale);
        backend.FlashForward(tq, tk, tv, to, lse, options);
        backend.SoftmaxRowDot(to, tdo, drow);
        backend.FlashBackward(tq, tk, tv, lse, drow, tdo, dq, dk, dv, options);
        backend.Synchronize();
        float[] o = Get(to), l = Get(lse);
        for (int h = 0; h < H; h++)
            for (int i = 0; i < Nq; i++)
            {
                bool masked = QOffset + i < KOffset;
                Assert.True(masked ? float.IsNegativeInfinity(l[h * Nq + i]) : float.IsFinite(l[h * Nq + i]), $"LSE[h={h}, i={i}] = {l[h * Nq + i]}");
                for (int e = 0; e < Dv; e++)
                    if (masked) Assert.Equal(0f, o[(i * H + h) * Dv + e]);
            }
        foreach (var (name, a) in new[] { ("O", o), ("dQ", Get(dq)), ("dK", Get(dk)), ("dV", Get(dv)) })
            Assert.True(a.All(float.IsFinite), $"{name} holds NaN or Inf");
        double err = new[]
        {
            ReferenceAttention.RelativeError(o, oRef), ReferenceAttention.RelativeError(l, lseRef), ReferenceAttention.RelativeError(Get(dq), dqRef),
            ReferenceAttention.RelativeError(Get(dk), dkRef), ReferenceAttention.RelativeError(Get(dv), dvRef),
        }.Max();
        output.WriteLine($"{backendName}: {KOffset} of {Nq} rows fully masked; max relative error {err:E2}");
        Assert.True(err <= 1e-4, $"{err:E2}");
    }

    private static readonly AttentionShape LongShape = new(1, 2048, 8, 2, 16, 16);

    private static readonly Lazy<GlobalInputs> LongSoftmaxInputs = new(() => GlobalInputs.Random(LongShape, 41));
    private static readonly Lazy<GlobalInputs> LongLightningInputs = new(() => GlobalInputs.Random(LongShape, 41, 1f, 0.25f));

    private static readonly Lazy<(double[] O, double[] DQ, double[] DK, double[] DV)> SoftmaxReference = new(() =>
    {
        var x = LongSoftmaxInputs.Value;
        var s = LongShape;
        var dims = new Dims(s.Batch, s.SeqLen, s.SeqLen, s.Heads, s.KvHeads, s.HeadDim, s.ValueDim);
        double[] W(float[] a) => [.. a.Select(f => (double)f)];
        var (q, k, v, dO) = (W(x.Q), W(x.K), W(x.V), W(x.DO));
        var o = ReferenceAttention.FlashForward(q, k, v, dims, 0, 0, true, 1 / Math.Sqrt(s.HeadDim)).O;
        var (dq, dk, dv) = ReferenceAttention.FlashBackward(q, k, v, dO, dims, 0, 0, true, 1 / Math.Sqrt(s.HeadDim));
        return (o, dq, dk, dv);
    });

    private static readonly Lazy<(double[] O, double[] DQ, double[] DK, double[] DV)> LightningReference = new(() =>
    {
        var x = LongLightningInputs.Value;
        var s = LongShape;
        var dims = new Dims(s.Batch, s.SeqLen, s.SeqLen, s.Heads, s.KvHeads, s.HeadDim, s.ValueDim);
        double[] W(float[] a) => [.. a.Select(f => (double)f)];
        var (q, k, v, dO) = (W(x.Q), W(x.K), W(x.V), W(x.DO));
        var decay = Enumerable.Range(0, s.Heads).Select(h => h % 2 == 0 ? (double)0.999f : 1.0).ToArray();
        var o = ReferenceAttention.LightningForward(q, k, v, decay, true, null, dims).O;
        var (dq, dk, dv, _) = ReferenceAttention.LightningBackward(q, k, v, decay, true, null, dO, null, dims);
        return (o, dq, dk, dv);
    });

    public static TheoryData<SchemeCase> LongCases() => [.. SchemeRun.AllSchemes(LongShape)];

    /// <summary>
    /// N = 2048 over P = 8: 256 tokens (four 64-row tiles) per rank, two 128-token chunks each with zigzag. The error
    /// against fp64 at P = 8 must be within 2x of P = 1's (floor 1e-6), and within 1e-4.
    /// </summary>
    [Theory]
    [MemberData(nameof(LongCases))]
    public void EveryScheme_P8_ErrorWithinTwiceP1(SchemeCase c)
    {
        bool lightning = c.Options.Attention == AttentionKind.Lightning;
        var x = lightning ? LongLightningInputs.Value : LongSoftmaxInputs.Value;
        var r = lightning ? LightningReference.Value : SoftmaxReference.Value;
        double Error(GlobalOutputs g) => new[]
        {
            ReferenceAttention.RelativeError(g.O, r.O), ReferenceAttention.RelativeError(g.DQ, r.DQ),
            ReferenceAttention.RelativeError(g.DK, r.DK), ReferenceAttention.RelativeError(g.DV, r.DV),
        }.Max();
        var one = new SchemeCase(c.Name, c.Shape, c.Options with { UlyssesDegree = c.Options.Scheme == ParallelScheme.Hybrid ? 1 : 0 });
        double e1 = Error(SchemeRun.Run(one, 1, x));
        double e8 = Error(SchemeRun.Run(c, 8, x));
        output.WriteLine($"{c.Name}: N = {c.Shape.SeqLen}, relative error P = 1 {e1:E2}, P = 8 {e8:E2} (ratio {e8 / e1:F2})");
        Assert.True(e8 <= 1e-4, $"P = 8: {e8:E2}");
        Assert.True(e8 <= Math.Max(2 * e1, 1e-6), $"P = 8 error {e8:E2} is more than twice P = 1's {e1:E2}");
    }

    private sealed class Disposables(IEnumerable<IDisposable> items) : IDisposable
    {
        public void Dispose()
        {
            foreach (var d in items) d.Dispose();
        }
    }
}
