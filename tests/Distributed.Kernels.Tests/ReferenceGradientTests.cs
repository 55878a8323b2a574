using Distributed.Reference;
using Xunit;
using Dims = Distributed.Reference.ReferenceAttention.Dims;

namespace Distributed.Kernels.Tests;

/// <summary>
/// Checks the fp64 reference itself, so the contract suite is not comparing kernels against a wrong oracle:
/// every backward by central finite differences of its own forward, the softmax merge against attention over
/// the whole KV, and lightning chunking (a chunk continuing another equals one run over both).
/// </summary>
public sealed class ReferenceGradientTests
{
    private const double Step = 1e-5;
    private const double GradTolerance = 1e-6;

    private static double Dot(double[] a, double[] b)
    {
        double s = 0;
        for (int i = 0; i < a.Length; i++) s += a[i] * b[i];
        return s;
    }

    /// <summary>∂loss/∂p[t] by central differences, for every element of <paramref name="p"/> (changed and restored in place).</summary>
    private static double[] NumericGradient(double[] p, Func<double> loss)
    {
        var g = new double[p.Length];
        for (int t = 0; t < p.Length; t++)
        {
            double keep = p[t];
            p[t] = keep + Step;
            double up = loss();
            p[t] = keep - Step;
            double down = loss();
            p[t] = keep;
            g[t] = (up - down) / (2 * Step);
        }
        return g;
    }

    private static void AssertGradient(double[] numeric, double[] analytic, string what)
    {
        Assert.Equal(numeric.Length, analytic.Length);
        double err = 0, mag = 0;
        for (int i = 0; i < numeric.Length; i++)
        {
            Assert.False(double.IsNaN(analytic[i]), $"{what}[{i}] is NaN");
            err = Math.Max(err, Math.Abs(numeric[i] - analytic[i]));
            mag = Math.Max(mag, Math.Abs(numeric[i]));
        }
        double rel = err / Math.Max(mag, 1e-3);
        Assert.True(rel <= GradTolerance, $"{what}: finite-difference mismatch {rel:E2} (max |grad| {mag:E2})");
    }

    private static void AssertSame(double[] expected, double[] actual, string what, double tolerance = 1e-12)
    {
        Assert.Equal(expected.Length, actual.Length);
        for (int i = 0; i < expected.Length; i++)
        {
            if (double.IsNegativeInfinity(expected[i]) && double.IsNegativeInfinity(actual[i])) continue;
            Assert.True(Math.Abs(expected[i] - actual[i]) <= tolerance * Math.Max(1, Math.Abs(expected[i])),
                $"{what}[{i}]: expected {expected[i]:R}, got {actual[i]:R}");
        }
    }

    // ----- softmax ----------------------------------------------------------------------------------

    public sealed record FlashGradCase(string Name, Dims X, long QOffset, long KOffset, bool Causal, double Scale)
    {
        public override string ToString() => Name;
    }

    public static TheoryData<FlashGradCase> FlashGradCases() =>
    [
        new("full, H4/2, Dv≠D", new Dims(1, 5, 6, 4, 2, 3, 4), 0, 0, false, 1 / Math.Sqrt(3)),
        new("causal, aligned, H2/1", new Dims(1, 6, 6, 2, 1, 4, 3), 0, 0, true, 0.7),
        new("causal, offsets, partly and fully masked rows", new Dims(2, 6, 5, 2, 2, 3, 3), 3, 6, true, 0.9),
    ];

    [Theory]
    [MemberData(nameof(FlashGradCases))]
    public void FlashBackward_MatchesFiniteDifferences(FlashGradCase c)
    {
        var x = c.X;
        var q = ReferenceAttention.Random((long)x.B * x.Nq * x.H * x.D, 101);
        var k = ReferenceAttention.Random((long)x.B * x.Nk * x.Hk * x.D, 102);
        var v = ReferenceAttention.Random((long)x.B * x.Nk * x.Hk * x.Dv, 103);
        var dO = ReferenceAttention.Random((long)x.B * x.Nq * x.H * x.Dv, 104);
        double Loss() => Dot(ReferenceAttention.FlashForward(q, k, v, x, c.QOffset, c.KOffset, c.Causal, c.Scale).O, dO);
        var (dq, dk, dv) = ReferenceAttention.FlashBackward(q, k, v, dO, x, c.QOffset, c.KOffset, c.Causal, c.Scale);
        AssertGradient(NumericGradient(q, Loss), dq, "dQ");
        AssertGradient(NumericGradient(k, Loss), dk, "dK");
        AssertGradient(NumericGradient(v, Loss), dv, "dV");
    }

    [Fact]
    public void FlashBackwardFromRowStats_OnKvShardsWithGlobalStats_SumsToFullBackward()
    {
        // What a KV-sharded scheme does: each shard's backward uses the LSE and Drow of the whole attention.
        var x = new Dims(1, 7, 9, 4, 2, 3, 5);
        var q = ReferenceAttention.Random(7L * 4 * 3, 111);
        var k = ReferenceAttention.Random(9L * 2 * 3, 112);
        var v = ReferenceAttention.Random(9L * 2 * 5, 113);
        var dO = ReferenceAttention.Random(7L * 4 * 5, 114);
        const long qOff = 3;
        const double scale = 0.8;
        var (o, lse) = ReferenceAttention.FlashForward(q, k, v, x, qOff, 0, true, scale);
        var drow = new double[lse.Length];
        for (int i = 0; i < 7; i++)
            for (int h = 0; h < 4; h++)
                for (int e = 0; e < 5; e++) drow[h * 7 + i] += o[(i * 4 + h) * 5 + e] * dO[(i * 4 + h) * 5 + e];
        var (fq, fk, fv) = ReferenceAttention.FlashBackward(q, k, v, dO, x, qOff, 0, true, scale);

        const int split = 4; // keys 4..8 are in the future of query rows 0..
        var x1 = x with { Nk = split };
        var x2 = x with { Nk = 9 - split };
        var (q1, k1, v1) = ReferenceAttention.FlashBackwardFromRowStats(q, k[..(split * 6)], v[..(split * 10)], lse, drow, dO, x1, qOff, 0, true, scale);
        var (q2, k2, v2) = ReferenceAttention.FlashBackwardFromRowStats(q, k[(split * 6)..], v[(split * 10)..], lse, drow, dO, x2, qOff, split, true, scale);
        AssertSame(fq, q1.Zip(q2, (a, b) => a + b).ToArray(), "dQ summed over shards");
        AssertSame(fk, [.. k1, .. k2], "dK");
        AssertSame(fv, [.. v1, .. v2], "dV");
    }

    [Fact]
    public void FlashForward_CausalWithOffsets_EqualsFullAttentionOverTheVisibleKeys()
    {
        // Query row i (global 5 + i) sees keys with global position 2 + j <= 5 + i, i.e. j <= 3 + i.
        var x = new Dims(1, 3, 8, 1, 1, 4, 4);
        var q = ReferenceAttention.Random(3 * 4, 121);
        var k = ReferenceAttention.Random(8 * 4, 122);
        var v = ReferenceAttention.Random(8 * 4, 123);
        var (o, lse) = ReferenceAttention.FlashForward(q, k, v, x, 5, 2, true, 0.5);
        for (int i = 0; i < 3; i++)
        {
            int visible = 4 + i;
            var (oi, li) = ReferenceAttention.FlashForward(q[(i * 4)..(i * 4 + 4)], k[..(visible * 4)], v[..(visible * 4)],
                new Dims(1, 1, visible, 1, 1, 4, 4), 0, 0, false, 0.5);
            AssertSame(oi, o[(i * 4)..(i * 4 + 4)], $"O row {i}");
            AssertSame(li, [lse[i]], $"LSE row {i}");
        }
        // Directly from the definition for row 0: LSE = log Σ_j≤3 exp(0.5 q·k_j).
        double sum = 0;
        for (int j = 0; j <= 3; j++) sum += Math.Exp(0.5 * Dot(q[..4], k[(j * 4)..(j * 4 + 4)]));
        Assert.Equal(Math.Log(sum), lse[0], 12);
    }

    [Fact]
    public void MergeSoftmax_TwoKvHalves_EqualsAttentionOverAll_AndMinusInfinityWeighsZero()
    {
        var x = new Dims(2, 5, 8, 2, 1, 3, 4);
        var q = ReferenceAttention.Random(2L * 5 * 2 * 3, 131);
        var k = ReferenceAttention.Random(2L * 8 * 3, 132);
        var v = ReferenceAttention.Random(2L * 8 * 4, 133);
        const long qOff = 2; // rows 0, 1 see only keys of the first half: the second half's partial is -inf there
        var (o, lse) = ReferenceAttention.FlashForward(q, k, v, x, qOff, 0, true, 0.6);
        double[] Half(double[] a, int width, int from) => [.. a.Skip(from * width).Take(4 * width), .. a.Skip((8 + from) * width).Take(4 * width)];
        var xh = x with { Nk = 4 };
        var (oa, la) = ReferenceAttention.FlashForward(q, Half(k, 3, 0), Half(v, 4, 0), xh, qOff, 0, true, 0.6);
        var (ob, lb) = ReferenceAttention.FlashForward(q, Half(k, 3, 4), Half(v, 4, 4), xh, qOff, 4, true, 0.6);
        Assert.Contains(lb, double.IsNegativeInfinity);
        var (mo, ml) = ReferenceAttention.MergeSoftmax(oa, la, ob, lb, 2, 5, 2, 4);
        AssertSame(o, mo, "merged O");
        AssertSame(lse, ml, "merged LSE");
        var (mo2, ml2) = ReferenceAttention.MergeSoftmax(ob, lb, oa, la, 2, 5, 2, 4);
        AssertSame(mo, mo2, "O, merged the other way round");
        AssertSame(ml, ml2, "LSE, merged the other way round");

        // Both sides empty: LSE stays -inf, O = 0, no NaN.
        var none = Enumerable.Repeat(double.NegativeInfinity, 3).ToArray();
        var (eo, el) = ReferenceAttention.MergeSoftmax(new double[3], none, new double[3], none, 1, 3, 1, 1);
        Assert.All(eo, d => Assert.Equal(0.0, d));
        Assert.All(el, d => Assert.True(double.IsNegativeInfinity(d)));
    }

    // ----- lightning --------------------------------------------------------------------------------

    public sealed record LightningGradCase(string Name, Dims X, bool Causal, double[] Decay, bool WithS0, bool WithDSEnd)
    {
        public override string ToString() => Name;
    }

    public static TheoryData<LightningGradCase> LightningGradCases() =>
    [
        new("causal λ0.9, S0, dS_end, H4/2, Dv≠D", new Dims(1, 6, 6, 4, 2, 3, 4), true, [0.9, 0.9, 0.9, 0.9], true, true),
        new("causal λ per head {1,0.5,0.01}, S0, H3/1", new Dims(1, 7, 7, 3, 1, 2, 3), true, [1, 0.5, 0.01], true, true),
        new("causal λ1, no S0, no dS_end, B2", new Dims(2, 5, 5, 2, 2, 3, 3), true, [1, 1], false, false),
        new("non-causal, S0, dS_end, H2/1", new Dims(1, 5, 5, 2, 1, 3, 2), false, [0.5, 0.5], true, true),
    ];

    [Theory]
    [MemberData(nameof(LightningGradCases))]
    public void LightningBackward_MatchesFiniteDifferences(LightningGradCase c)
    {
        var x = c.X;
        var q = ReferenceAttention.Random((long)x.B * x.Nq * x.H * x.D, 201);
        var k = ReferenceAttention.Random((long)x.B * x.Nk * x.Hk * x.D, 202);
        var v = ReferenceAttention.Random((long)x.B * x.Nk * x.Hk * x.Dv, 203);
        var s0 = ReferenceAttention.Random((long)x.B * x.H * x.D * x.Dv, 204);
        var dO = ReferenceAttention.Random((long)x.B * x.Nq * x.H * x.Dv, 205);
        var dSEnd = c.WithDSEnd ? ReferenceAttention.Random((long)x.B * x.H * x.D * x.Dv, 206) : null;
        var s0Used = c.WithS0 ? s0 : null;
        double Loss()
        {
            var (o, sEnd) = ReferenceAttention.LightningForward(q, k, v, c.Decay, c.Causal, c.WithS0 ? s0 : null, x);
            return Dot(o, dO) + (dSEnd is null ? 0 : Dot(sEnd, dSEnd));
        }
        var (dq, dk, dv, ds0) = ReferenceAttention.LightningBackward(q, k, v, c.Decay, c.Causal, s0Used, dO, dSEnd, x);
        AssertGradient(NumericGradient(q, Loss), dq, "dQ");
        AssertGradient(NumericGradient(k, Loss), dk, "dK");
        AssertGradient(NumericGradient(v, Loss), dv, "dV");
        // The loss is linear in S0, so dS0 does not depend on S0 being present; check it where S0 enters.
        if (c.WithS0) AssertGradient(NumericGradient(s0, Loss), ds0, "dS0");
    }

    [Fact]
    public void LightningBackward_WithoutS0_GivesTheGradientAtZeroState()
    {
        var x = new Dims(1, 4, 4, 2, 1, 3, 2);
        var q = ReferenceAttention.Random(4 * 2 * 3, 211);
        var k = ReferenceAttention.Random(4 * 3, 212);
        var v = ReferenceAttention.Random(4 * 2, 213);
        var dO = ReferenceAttention.Random(4 * 2 * 2, 214);
        var dSEnd = ReferenceAttention.Random(2 * 3 * 2, 215);
        double[] decay = [0.7, 0.3];
        var zero = new double[2 * 3 * 2];
        var withZero = ReferenceAttention.LightningBackward(q, k, v, decay, true, zero, dO, dSEnd, x);
        var withNull = ReferenceAttention.LightningBackward(q, k, v, decay, true, null, dO, dSEnd, x);
        AssertSame(withZero.dQ, withNull.dQ, "dQ");
        AssertSame(withZero.dS0, withNull.dS0, "dS0");
        double Loss()
        {
            var (o, sEnd) = ReferenceAttention.LightningForward(q, k, v, decay, true, zero, x);
            return Dot(o, dO) + Dot(sEnd, dSEnd);
        }
        AssertGradient(NumericGradient(zero, Loss), withNull.dS0, "dS0 at S0 = 0");
    }

    [Fact]
    public void LightningForward_Causal_EqualsTheRecurrence()
    {
        // The recurrence S_t = λ S_{t−1} + k_tᵀ v_t, o_t = q_t S_t, written out independently of the direct sum.
        var x = new Dims(1, 9, 9, 1, 1, 3, 2);
        var q = ReferenceAttention.Random(9 * 3, 221);
        var k = ReferenceAttention.Random(9 * 3, 222);
        var v = ReferenceAttention.Random(9 * 2, 223);
        var s0 = ReferenceAttention.Random(3 * 2, 224);
        const double lam = 0.8;
        var (o, sEnd) = ReferenceAttention.LightningForward(q, k, v, [lam], true, s0, x);
        var state = (double[])s0.Clone();
        for (int t = 0; t < 9; t++)
        {
            for (int d = 0; d < 3; d++)
                for (int e = 0; e < 2; e++) state[d * 2 + e] = lam * state[d * 2 + e] + k[t * 3 + d] * v[t * 2 + e];
            for (int e = 0; e < 2; e++)
            {
                double acc = 0;
                for (int d = 0; d < 3; d++) acc += q[t * 3 + d] * state[d * 2 + e];
                Assert.Equal(acc, o[t * 2 + e], 12);
            }
        }
        AssertSame(state, sEnd, "S_end");
        var m = ReferenceAttention.ChunkState(k, v, [lam], true, x);
        var sNoS0 = ReferenceAttention.LightningForward(q, k, v, [lam], true, null, x).SEnd;
        AssertSame(sNoS0, m, "chunk state = S_end without S0");
    }

    [Theory]
    [InlineData(0.9, true)]
    [InlineData(0.01, true)]
    [InlineData(1.0, false)]
    public void LightningForwardAndBackward_TwoChunks_EqualOneRunOverBoth(double lam, bool withS0)
    {
        // Chunk 2 continues chunk 1 through S0 = S_end(chunk 1); in backward, dS_end(chunk 1) = dS0(chunk 2).
        const int n1 = 5, n2 = 4, n = n1 + n2, h = 2, hk = 1, d = 3, dv = 2;
        var q = ReferenceAttention.Random(n * h * d, 231);
        var k = ReferenceAttention.Random(n * hk * d, 232);
        var v = ReferenceAttention.Random(n * hk * dv, 233);
        var dO = ReferenceAttention.Random(n * h * dv, 234);
        var dSEnd = ReferenceAttention.Random(h * d * dv, 235);
        double[]? s0 = withS0 ? ReferenceAttention.Random(h * d * dv, 236) : null;
        double[] decay = [lam, 1.0];
        var all = new Dims(1, n, n, h, hk, d, dv);
        var x1 = all with { Nq = n1, Nk = n1 };
        var x2 = all with { Nq = n2, Nk = n2 };
        double[] First(double[] a, int width) => a[..(n1 * width)];
        double[] Second(double[] a, int width) => a[(n1 * width)..];

        var (o, sEnd) = ReferenceAttention.LightningForward(q, k, v, decay, true, s0, all);
        var (o1, s1) = ReferenceAttention.LightningForward(First(q, h * d), First(k, hk * d), First(v, hk * dv), decay, true, s0, x1);
        var (o2, s2) = ReferenceAttention.LightningForward(Second(q, h * d), Second(k, hk * d), Second(v, hk * dv), decay, true, s1, x2);
        AssertSame(o, [.. o1, .. o2], "O");
        AssertSame(sEnd, s2, "S_end");

        var full = ReferenceAttention.LightningBackward(q, k, v, decay, true, s0, dO, dSEnd, all);
        var b2 = ReferenceAttention.LightningBackward(Second(q, h * d), Second(k, hk * d), Second(v, hk * dv), decay, true, s1, Second(dO, h * dv), dSEnd, x2);
        var b1 = ReferenceAttention.LightningBackward(First(q, h * d), First(k, hk * d), First(v, hk * dv), decay, true, s0, First(dO, h * dv), b2.dS0, x1);
        AssertSame(full.dQ, [.. b1.dQ, .. b2.dQ], "dQ");
        AssertSame(full.dK, [.. b1.dK, .. b2.dK], "dK");
        AssertSame(full.dV, [.. b1.dV, .. b2.dV], "dV");
        AssertSame(full.dS0, b1.dS0, "dS0");
    }

    [Theory]
    [InlineData(true, 0.6)]
    [InlineData(true, 0.01)]
    [InlineData(false, 1.0)]
    public void ChunkStateAndItsBackward_MatchFiniteDifferences(bool causal, double lam)
    {
        var x = new Dims(1, 6, 6, 2, 1, 3, 2);
        var q = ReferenceAttention.Random(6 * 2 * 3, 241);
        var k = ReferenceAttention.Random(6 * 3, 242);
        var v = ReferenceAttention.Random(6 * 2, 243);
        var dO = ReferenceAttention.Random(6 * 2 * 2, 244);
        var s0 = new double[2 * 3 * 2];
        double[] decay = [lam, 0.5];
        // dM is the gradient reaching S0 from this chunk's outputs alone.
        var dm = ReferenceAttention.ChunkStateBackward(q, dO, decay, causal, x);
        AssertGradient(NumericGradient(s0, () => Dot(ReferenceAttention.LightningForward(q, k, v, decay, causal, s0, x).O, dO)), dm, "dM");
        // M is linear in each k_j: its gradient against a random dM is Σ λ^(N−1−j) dM v_j, checked numerically.
        var m = ReferenceAttention.ChunkState(k, v, decay, causal, x);
        var g = ReferenceAttention.Random(m.Length, 245);
        var numeric = NumericGradient(k, () => Dot(ReferenceAttention.ChunkState(k, v, decay, causal, x), g));
        var analytic = new double[k.Length];
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 6; j++)
            {
                double w = causal ? Math.Pow(decay[h], 5 - j) : 1.0;
                for (int dd = 0; dd < 3; dd++)
                    for (int e = 0; e < 2; e++) analytic[j * 3 + dd] += w * g[(h * 3 + dd) * 2 + e] * v[j * 2 + e];
            }
        AssertGradient(numeric, analytic, "∂M/∂K");
        // And M is S_end of a run from S0 = 0.
        AssertSame(ReferenceAttention.LightningForward(q, k, v, decay, causal, null, x).SEnd, m, "M = S_end from zero");
    }

    [Fact]
    public void LightningForward_LongChunkStrongDecay_IsFiniteAndLocal()
    {
        // λ = 0.01 over 300 tokens: λ^300 underflows to 0, which must give 0 weight, never NaN or inf.
        var x = new Dims(1, 300, 300, 1, 1, 2, 2);
        var q = ReferenceAttention.Random(600, 251);
        var k = ReferenceAttention.Random(600, 252);
        var v = ReferenceAttention.Random(600, 253);
        var s0 = ReferenceAttention.Random(4, 254);
        var (o, sEnd) = ReferenceAttention.LightningForward(q, k, v, [0.01], true, s0, x);
        Assert.All(o, d => Assert.True(double.IsFinite(d)));
        Assert.All(sEnd, d => Assert.True(double.IsFinite(d)));
        // Far from the start, o_i is dominated by its own token: o_i ≈ (q_i·k_i) v_i to within ~1%.
        int i = 299;
        double qk = q[i * 2] * k[i * 2] + q[i * 2 + 1] * k[i * 2 + 1];
        for (int e = 0; e < 2; e++) Assert.True(Math.Abs(o[i * 2 + e] - qk * v[i * 2 + e]) <= 0.03, $"o[{i},{e}] = {o[i * 2 + e]} vs {qk * v[i * 2 + e]}");
    }
}
