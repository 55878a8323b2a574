using Distributed.Kernels;
using Distributed.Reference;
using Xunit;
using Dims = Distributed.Reference.ReferenceAttention.Dims;

namespace Distributed.Kernels.Tests;

/// <summary>
/// Every block operation of <see cref="IKernelBackend"/> against the one fp64 reference, at shapes that hit
/// the edges: N not a multiple of the tile, D of 16..128, Dv ≠ D, GQA 4/4, 4/2, 4/1, causal with global
/// offsets (partly and fully masked rows), λ in {1, 0.9, 0.01}, incoming and outgoing states. One suite,
/// run once per backend by a subclass (fast backends add the large cases by calling the Check methods).
/// Relative error = max|a − b| / max(max|b|, 0.01) ≤ 1e-4 (see <see cref="ReferenceAttention.RelativeError"/>).
/// </summary>
public abstract partial class KernelBackendContract : IDisposable
{
    protected const double Tolerance = 1e-4;
    private IKernelBackend? _backend;

    protected abstract IKernelBackend CreateBackend();

    protected IKernelBackend Backend => _backend ??= CreateBackend();

    /// <summary>Whether each test disposes its backend; false where a subclass shares one backend across its tests.</summary>
    protected virtual bool DisposesBackend => true;

    public void Dispose()
    {
        if (DisposesBackend) _backend?.Dispose();
        OnDispose();
        GC.SuppressFinalize(this);
    }

    protected virtual void OnDispose() { }

    // ----- shapes -----------------------------------------------------------------------------------

    public sealed record FlashCase(int B, int Nq, int Nk, int H, int Hk, int D, int Dv, bool Causal, long QOffset = 0, long KOffset = 0, float Scale = 0f)
    {
        public Dims Dims => new(B, Nq, Nk, H, Hk, D, Dv);

        public override string ToString() => $"B{B} Nq{Nq} Nk{Nk} H{H}/{Hk} D{D} Dv{Dv} {(Causal ? $"causal q@{QOffset} k@{KOffset}" : "full")}{(Scale > 0 ? $" scale{Scale}" : "")}";
    }

    public static TheoryData<FlashCase> FlashCases() =>
    [
        new FlashCase(1, 1, 1, 4, 4, 16, 16, false),
        new FlashCase(1, 17, 17, 4, 2, 32, 32, true),
        new FlashCase(1, 64, 64, 4, 1, 64, 64, true),
        new FlashCase(1, 100, 100, 4, 4, 16, 24, false),
        new FlashCase(1, 100, 100, 4, 2, 64, 64, true),
        new FlashCase(2, 17, 64, 4, 2, 32, 32, true, 100, 60),   // partly masked rows
        new FlashCase(1, 100, 64, 4, 1, 64, 64, true, 0, 64),    // rows 0..63 see no key at all
        new FlashCase(1, 33, 130, 4, 4, 128, 128, true, 130, 0), // D = 128, every key in the past
        new FlashCase(1, 17, 17, 4, 4, 32, 32, false, 0, 0, 0.3f),
    ];

    public static TheoryData<FlashCase> LargeFlashCases() =>
    [
        new FlashCase(1, 2048, 2048, 2, 1, 64, 64, true),
        new FlashCase(1, 1000, 1500, 2, 2, 64, 64, false),
    ];

    public sealed record LightningCase(int B, int N, int H, int Hk, int D, int Dv, bool Causal, float[] Decay, bool WithS0)
    {
        public Dims Dims => new(B, N, N, H, Hk, D, Dv);

        public override string ToString() => $"B{B} N{N} H{H}/{Hk} D{D} Dv{Dv} {(Causal ? "causal" : "full")} λ[{string.Join(",", Decay.Distinct())}]{(WithS0 ? " S0" : "")}";
    }

    private static float[] Same(float l) => [l, l, l, l];

    public static TheoryData<LightningCase> LightningCases() =>
    [
        new LightningCase(1, 1, 4, 4, 16, 16, true, Same(1f), false),
        new LightningCase(1, 17, 4, 2, 32, 32, true, Same(0.9f), true),
        new LightningCase(1, 64, 4, 1, 64, 64, true, Same(0.01f), true),
        new LightningCase(1, 100, 4, 4, 16, 24, true, Same(0.9f), true),
        new LightningCase(2, 100, 4, 2, 32, 32, true, Same(0.01f), false),
        new LightningCase(1, 100, 4, 1, 64, 64, true, Same(0.01f), true),
        new LightningCase(1, 17, 4, 1, 32, 16, false, Same(1f), false),
        new LightningCase(1, 100, 4, 4, 32, 32, false, Same(1f), true),
        new LightningCase(1, 130, 4, 2, 16, 16, true, [1f, 0.9f, 0.5f, 0.01f], true),
    ];

    /// <summary>Backward at large N costs the naive fp64 reference O(N²·D) per head: smaller than forward's.</summary>
    public static TheoryData<FlashCase> LargeFlashBackwardCases() =>
    [
        new FlashCase(1, 700, 700, 2, 1, 64, 64, true),
        new FlashCase(1, 300, 650, 2, 2, 64, 64, false),
    ];

    public static TheoryData<LightningCase> LargeLightningBackwardCases() =>
    [
        new LightningCase(1, 333, 4, 2, 64, 64, true, [1f, 0.99f, 0.9f, 0.5f], true),
    ];

    public static TheoryData<LightningCase> LargeLightningCases() =>
    [
        new LightningCase(1, 1000, 4, 2, 64, 64, true, [1f, 0.99f, 0.9f, 0.5f], true),
    ];

    // ----- helpers ----------------------------------------------------------------------------------

    protected DeviceTensor Upload(double[] data, params int[] shape)
    {
        var t = Backend.Allocate(shape);
        t.CopyFromHost(data.Select(d => (float)d).ToArray());
        return t;
    }

    /// <summary>
    /// An output tensor filled with a stale value, so an operation that adds to its output instead of overwriting
    /// it (or skips masked rows) fails; freshly allocated tensors are zero and would hide that.
    /// </summary>
    protected DeviceTensor Stale(params int[] shape)
    {
        var t = Backend.Allocate(shape);
        var fill = new float[t.Length];
        Array.Fill(fill, 7.25f);
        t.CopyFromHost(fill);
        return t;
    }

    protected static float[] Download(DeviceTensor t)
    {
        var a = new float[t.Length];
        t.CopyToHost(a);
        return a;
    }

    protected static void AssertClose(double[] expected, DeviceTensor actual, string what, double tolerance = Tolerance)
    {
        var a = Download(actual);
        double err = ReferenceAttention.RelativeError(a, expected);
        Assert.True(err <= tolerance, $"{what}: relative error {err:E2} > {tolerance:E0}");
    }

    private static double ScaleOf(FlashCase c) => c.Scale > 0 ? c.Scale : 1.0 / Math.Sqrt(c.D);

    // ----- softmax ----------------------------------------------------------------------------------

    [Theory]
    [MemberData(nameof(FlashCases))]
    public void FlashForward_MatchesReference(FlashCase c) => CheckFlashForward(c);

    [Theory]
    [MemberData(nameof(FlashCases))]
    public void FlashBackward_MatchesReference(FlashCase c) => CheckFlashBackward(c);



    protected void CheckFlashForward(FlashCase c)
    {
        var x = c.Dims;
        var q = ReferenceAttention.Random((long)x.B * x.Nq * x.H * x.D, 1);
        var k = ReferenceAttention.Random((long)x.B * x.Nk * x.Hk * x.D, 2);
        var v = ReferenceAttention.Random((long)x.B * x.Nk * x.Hk * x.Dv, 3);
        var (eo, expectedLse) = ReferenceAttention.FlashForward(q, k, v, x, c.QOffset, c.KOffset, c.Causal, ScaleOf(c));
        using var tq = Upload(q, x.B, x.Nq, x.H, x.D);
        using var tk = Upload(k, x.B, x.Nk, x.Hk, x.D);
        using var tv = Upload(v, x.B, x.Nk, x.Hk, x.Dv);
        using var to = Stale(x.B, x.Nq, x.H, x.Dv);
        using var tl = Stale(x.B, x.H, x.Nq);
        Backend.FlashForward(tq, tk, tv, to, tl, new FlashOptions(c.QOffset, c.KOffset, c.Causal, c.Scale));
        AssertClose(eo, to, "O");
        AssertClose(expectedLse, tl, "LSE");
        Assert.DoesNotContain(Download(to), f => float.IsNaN(f));
    }

    protected void CheckFlashBackward(FlashCase c)
    {
        var x = c.Dims;
        var q = ReferenceAttention.Random((long)x.B * x.Nq * x.H * x.D, 11);
        var k = ReferenceAttention.Random((long)x.B * x.Nk * x.Hk * x.D, 12);
        var v = ReferenceAttention.Random((long)x.B * x.Nk * x.Hk * x.Dv, 13);
        var dO = ReferenceAttention.Random((long)x.B * x.Nq * x.H * x.Dv, 14);
        double scale = ScaleOf(c);
        var (edq, edk, edv) = ReferenceAttention.FlashBackward(q, k, v, dO, x, c.QOffset, c.KOffset, c.Causal, scale);
        using var tq = Upload(q, x.B, x.Nq, x.H, x.D);
        using var tk = Upload(k, x.B, x.Nk, x.Hk, x.D);
        using var tv = Upload(v, x.B, x.Nk, x.Hk, x.Dv);
        using var tdo = Upload(dO, x.B, x.Nq, x.H, x.Dv);
        using var to = Stale(x.B, x.Nq, x.H, x.Dv);
        using var tl = Stale(x.B, x.H, x.Nq);
        using var drow = Stale(x.B, x.H, x.Nq);
        using var dq = Stale(x.B, x.Nq, x.H, x.D);
        using var dk = Stale(x.B, x.Nk, x.Hk, x.D);
        using var dv = Stale(x.B, x.Nk, x.Hk, x.Dv);
        var opt = new FlashOptions(c.QOffset, c.KOffset, c.Causal, c.Scale);
        Backend.FlashForward(tq, tk, tv, to, tl, opt);
        Backend.SoftmaxRowDot(to, tdo, drow);
        Backend.FlashBackward(tq, tk, tv, tl, drow, tdo, dq, dk, dv, opt);
        AssertClose(edq, dq, "dQ");
        AssertClose(edk, dk, "dK");
        AssertClose(edv, dv, "dV");
        // Accumulate adds on top of what is there.
        Backend.FlashBackward(tq, tk, tv, tl, drow, tdo, dq, dk, dv, opt with { Accumulate = true });
        AssertClose(edq.Select(a => 2 * a).ToArray(), dq, "2·dQ (accumulate)");
        AssertClose(edk.Select(a => 2 * a).ToArray(), dk, "2·dK (accumulate)");
        AssertClose(edv.Select(a => 2 * a).ToArray(), dv, "2·dV (accumulate)");
    }

    [Fact]
    public void FlashBackward_OnKvShardsWithGlobalLse_SumsToFullGradient()
    {
        // Keys split in two shards at global offsets 0 and 40: each shard's backward, given the global
        // LSE and Drow, is exact; dQ accumulates over shards.
        var x = new Dims(1, 50, 90, 4, 2, 32, 32);
        var q = ReferenceAttention.Random(50L * 4 * 32, 21);
        var k = ReferenceAttention.Random(90L * 2 * 32, 22);
        var v = ReferenceAttention.Random(90L * 2 * 32, 23);
        var dO = ReferenceAttention.Random(50L * 4 * 32, 24);
        const long qOff = 60;
        var (edq, edk, edv) = ReferenceAttention.FlashBackward(q, k, v, dO, x, qOff, 0, true, 1 / Math.Sqrt(32));
        using var tq = Upload(q, 1, 50, 4, 32);
        using var tdo = Upload(dO, 1, 50, 4, 32);
        using var tk = Upload(k, 1, 90, 2, 32);
        using var tv = Upload(v, 1, 90, 2, 32);
        using var o = Backend.Allocate(1, 50, 4, 32);
        using var lse = Backend.Allocate(1, 4, 50);
        using var drow = Backend.Allocate(1, 4, 50);
        Backend.FlashForward(tq, tk, tv, o, lse, new FlashOptions(qOff, 0, true));
        Backend.SoftmaxRowDot(o, tdo, drow);
        using var k1 = Upload(k[..(40 * 64)], 1, 40, 2, 32);
        using var v1 = Upload(v[..(40 * 64)], 1, 40, 2, 32);
        using var k2 = Upload(k[(40 * 64)..], 1, 50, 2, 32);
        using var v2 = Upload(v[(40 * 64)..], 1, 50, 2, 32);
        using var dq = Stale(1, 50, 4, 32);
        using var dk1 = Backend.Allocate(1, 40, 2, 32);
        using var dv1 = Backend.Allocate(1, 40, 2, 32);
        using var dk2 = Stale(1, 50, 2, 32);
        using var dv2 = Stale(1, 50, 2, 32);
        Backend.FlashBackward(tq, k2, v2, lse, drow, tdo, dq, dk2, dv2, new FlashOptions(qOff, 40, true));
        Backend.FlashBackward(tq, k1, v1, lse, drow, tdo, dq, dk1, dv1, new FlashOptions(qOff, 0, true, Accumulate: true));
        AssertClose(edq, dq, "dQ over both shards");
        AssertClose(edk[..(40 * 64)], dk1, "dK shard 1");
        AssertClose(edk[(40 * 64)..], dk2, "dK shard 2");
        AssertClose(edv[(40 * 64)..], dv2, "dV shard 2");
    }

    [Fact]
    public void FlashForward_RowsThatSeeNoKey_GiveZeroAndMinusInfinity()
    {
        using var q = Upload(ReferenceAttention.Random(10L * 4 * 16, 31), 1, 10, 4, 16);
        using var k = Upload(ReferenceAttention.Random(70L * 4 * 16, 32), 1, 70, 4, 16);
        using var v = Upload(ReferenceAttention.Random(70L * 4 * 16, 33), 1, 70, 4, 16);
        using var o = Stale(1, 10, 4, 16);
        using var lse = Stale(1, 4, 10);
        Backend.FlashForward(q, k, v, o, lse, new FlashOptions(0, 1000, true)); // every key is in the future
        Assert.All(Download(o), f => Assert.Equal(0f, f));
        Assert.All(Download(lse), f => Assert.True(float.IsNegativeInfinity(f)));
    }

    [Fact]
    public void MergeSoftmax_TwoKvHalves_EqualAttentionOverAll()
    {
        var x = new Dims(2, 19, 60, 4, 2, 32, 24);
        var q = ReferenceAttention.Random(2L * 19 * 4 * 32, 41);
        var k = ReferenceAttention.Random(2L * 60 * 2 * 32, 42);
        var v = ReferenceAttention.Random(2L * 60 * 2 * 24, 43);
        const long qOff = 20; // causal: rows 0..9 see only the first half, so -inf partials occur
        var (eo, expectedLse) = ReferenceAttention.FlashForward(q, k, v, x, qOff, 0, true, 1 / Math.Sqrt(32));
        double[] Half(double[] a, int width, int from, int count)
        {
            var r = new List<double>();
            for (int b = 0; b < 2; b++) r.AddRange(a.Skip((b * 60 + from) * width).Take(count * width));
            return [.. r];
        }
        using var tq = Upload(q, 2, 19, 4, 32);
        using var ka = Upload(Half(k, 64, 0, 30), 2, 30, 2, 32);
        using var va = Upload(Half(v, 48, 0, 30), 2, 30, 2, 24);
        using var kb = Upload(Half(k, 64, 30, 30), 2, 30, 2, 32);
        using var vb = Upload(Half(v, 48, 30, 30), 2, 30, 2, 24);
        using var oa = Backend.Allocate(2, 19, 4, 24);
        using var la = Backend.Allocate(2, 4, 19);
        using var ob = Backend.Allocate(2, 19, 4, 24);
        using var lb = Backend.Allocate(2, 4, 19);
        Backend.FlashForward(tq, kb, vb, ob, lb, new FlashOptions(qOff, 30, true));
        Backend.FlashForward(tq, ka, va, oa, la, new FlashOptions(qOff, 0, true));
        Assert.Contains(Download(lb), float.IsNegativeInfinity);
        Backend.MergeSoftmax(oa, la, ob, lb);
        AssertClose(eo, oa, "merged O");
        AssertClose(expectedLse, la, "merged LSE");
        // Merging a state that saw nothing changes nothing, and merging into one that saw nothing copies.
        using var empty = Backend.Allocate(2, 19, 4, 24);
        using var emptyLse = Upload(Enumerable.Repeat(double.NegativeInfinity, 2 * 4 * 19).ToArray(), 2, 4, 19);
        Backend.MergeSoftmax(oa, la, empty, emptyLse);
        AssertClose(eo, oa, "merged with nothing");
        Backend.MergeSoftmax(empty, emptyLse, oa, la);
        AssertClose(eo, empty, "nothing merged with O");
    }

    // ----- lightning --------------------------------------------------------------------------------

    [Theory]
    [MemberData(nameof(LightningCases))]
    public void LightningForward_MatchesReference(LightningCase c) => CheckLightningForward(c);

    [Theory]
    [MemberData(nameof(LightningCases))]
    public void LightningBackward_MatchesReference(LightningCase c) => CheckLightningBackward(c);



    private (double[] q, double[] k, double[] v, double[]? s0) LightningInputs(LightningCase c, int seed)
    {
        var x = c.Dims;
        // Scaled so long causal sums stay O(1).
        double amp = 1.0 / Math.Sqrt(Math.Max(1, Math.Min(c.N, 64)));
        return (ReferenceAttention.Random((long)x.B * x.Nq * x.H * x.D, seed, 1.0),
            ReferenceAttention.Random((long)x.B * x.Nk * x.Hk * x.D, seed + 1, amp),
            ReferenceAttention.Random((long)x.B * x.Nk * x.Hk * x.Dv, seed + 2, 1.0),
            c.WithS0 ? ReferenceAttention.Random((long)x.B * x.H * x.D * x.Dv, seed + 3, 0.5) : null);
    }

    protected void CheckLightningForward(LightningCase c)
    {
        var x = c.Dims;
        var (q, k, v, s0) = LightningInputs(c, 51);
        var decay = c.Decay.Select(f => (double)f).ToArray();
        var (eo, es) = ReferenceAttention.LightningForward(q, k, v, decay, c.Causal, s0, x);
        using var tq = Upload(q, x.B, x.Nq, x.H, x.D);
        using var tk = Upload(k, x.B, x.Nk, x.Hk, x.D);
        using var tv = Upload(v, x.B, x.Nk, x.Hk, x.Dv);
        using var ts0 = s0 is null ? null : Upload(s0, x.B, x.H, x.D, x.Dv);
        using var to = Stale(x.B, x.Nq, x.H, x.Dv);
        using var tse = Stale(x.B, x.H, x.D, x.Dv);
        Backend.LightningForward(tq, tk, tv, c.Decay, c.Causal, ts0, to, tse);
        AssertClose(eo, to, "O");
        AssertClose(es, tse, "S_end");
        // Without an outgoing state the output is the same.
        using var to2 = Stale(x.B, x.Nq, x.H, x.Dv);
        Backend.LightningForward(tq, tk, tv, c.Decay, c.Causal, ts0, to2, null);
        AssertClose(eo, to2, "O (no S_end)");
        // The chunk state is S_end without S0.
        var em = ReferenceAttention.ChunkState(k, v, decay, c.Causal, x);
        using var tm = Stale(x.B, x.H, x.D, x.Dv);
        Backend.LightningChunkState(tk, tv, c.Decay, c.Causal, tm);
        AssertClose(em, tm, "chunk state M");
    }

    protected void CheckLightningBackward(LightningCase c)
    {
        var x = c.Dims;
        var (q, k, v, s0) = LightningInputs(c, 61);
        var decay = c.Decay.Select(f => (double)f).ToArray();
        var dO = ReferenceAttention.Random((long)x.B * x.Nq * x.H * x.Dv, 65);
        var dSEnd = ReferenceAttention.Random((long)x.B * x.H * x.D * x.Dv, 66, 0.5);
        var (edq, edk, edv, eds0) = ReferenceAttention.LightningBackward(q, k, v, decay, c.Causal, s0, dO, dSEnd, x);
        using var tq = Upload(q, x.B, x.Nq, x.H, x.D);
        using var tk = Upload(k, x.B, x.Nk, x.Hk, x.D);
        using var tv = Upload(v, x.B, x.Nk, x.Hk, x.Dv);
        using var ts0 = s0 is null ? null : Upload(s0, x.B, x.H, x.D, x.Dv);
        using var tdo = Upload(dO, x.B, x.Nq, x.H, x.Dv);
        using var tdse = Upload(dSEnd, x.B, x.H, x.D, x.Dv);
        using var dq = Stale(x.B, x.Nq, x.H, x.D);
        using var dk = Stale(x.B, x.Nk, x.Hk, x.D);
        using var dv = Stale(x.B, x.Nk, x.Hk, x.Dv);
        using var ds0 = Stale(x.B, x.H, x.D, x.Dv);
        Backend.LightningBackward(tq, tk, tv, c.Decay, c.Causal, ts0, tdo, tdse, dq, dk, dv, ds0);
        AssertClose(edq, dq, "dQ");
        AssertClose(edk, dk, "dK");
        AssertClose(edv, dv, "dV");
        AssertClose(eds0, ds0, "dS0");
        // Without dS_end and without dS0.
        var (edq2, edk2, _, _) = ReferenceAttention.LightningBackward(q, k, v, decay, c.Causal, s0, dO, null, x);
        Backend.LightningBackward(tq, tk, tv, c.Decay, c.Causal, ts0, tdo, null, dq, dk, dv, null);
        AssertClose(edq2, dq, "dQ (no dS_end)");
        AssertClose(edk2, dk, "dK (no dS_end)");
        // The chunk-state mirror.
        var edm = ReferenceAttention.ChunkStateBackward(q, dO, decay, c.Causal, x);
        using var dm = Stale(x.B, x.H, x.D, x.Dv);
        Backend.LightningChunkStateBackward(tq, tdo, c.Decay, c.Causal, dm);
        AssertClose(edm, dm, "chunk state dM");
    }

    [Fact]
    public void Lightning_SecondChunkContinuesTheFirst_EqualsOneRunOverBoth()
    {
        // How LASP-2 chains chunks: forward S0(chunk 2) = S_end(chunk 1); backward dS_end(chunk 1) = dS0(chunk 2).
        const int n1 = 17, n2 = 20, n = n1 + n2, h = 4, hk = 2, d = 16, dv = 24;
        float[] decay = [0.9f, 0.01f, 1f, 0.5f];
        var lam = decay.Select(f => (double)f).ToArray();
        var q = ReferenceAttention.Random(n * h * d, 71);
        var k = ReferenceAttention.Random(n * hk * d, 72, 0.25);
        var v = ReferenceAttention.Random(n * hk * dv, 73);
        var dO = ReferenceAttention.Random(n * h * dv, 74);
        var s0 = ReferenceAttention.Random(h * d * dv, 75, 0.5);
        var all = new Dims(1, n, n, h, hk, d, dv);
        var (eo, es) = ReferenceAttention.LightningForward(q, k, v, lam, true, s0, all);
        var (edq, edk, edv, eds0) = ReferenceAttention.LightningBackward(q, k, v, lam, true, s0, dO, null, all);
        double[] Part(double[] a, int width, int chunk) => chunk == 0 ? a[..(n1 * width)] : a[(n1 * width)..];
        DeviceTensor Up(double[] a, int width, int chunk, int heads, int dim) => Upload(Part(a, width, chunk), 1, chunk == 0 ? n1 : n2, heads, dim);
        using var q1 = Up(q, h * d, 0, h, d);
        using var q2 = Up(q, h * d, 1, h, d);
        using var k1 = Up(k, hk * d, 0, hk, d);
        using var k2 = Up(k, hk * d, 1, hk, d);
        using var v1 = Up(v, hk * dv, 0, hk, dv);
        using var v2 = Up(v, hk * dv, 1, hk, dv);
        using var do1 = Up(dO, h * dv, 0, h, dv);
        using var do2 = Up(dO, h * dv, 1, h, dv);
        using var ts0 = Upload(s0, 1, h, d, dv);
        using var o1 = Stale(1, n1, h, dv);
        using var o2 = Stale(1, n2, h, dv);
        using var mid = Stale(1, h, d, dv);
        using var end = Stale(1, h, d, dv);
        Backend.LightningForward(q1, k1, v1, decay, true, ts0, o1, mid);
        Backend.LightningForward(q2, k2, v2, decay, true, mid, o2, end);
        AssertClose(Part(eo, h * dv, 0), o1, "O chunk 1");
        AssertClose(Part(eo, h * dv, 1), o2, "O chunk 2");
        AssertClose(es, end, "S_end after both");

        using var dq1 = Stale(1, n1, h, d);
        using var dq2 = Stale(1, n2, h, d);
        using var dk1 = Stale(1, n1, hk, d);
        using var dk2 = Stale(1, n2, hk, d);
        using var dv1 = Stale(1, n1, hk, dv);
        using var dv2 = Stale(1, n2, hk, dv);
        using var dMid = Stale(1, h, d, dv);
        using var dS0 = Stale(1, h, d, dv);
        Backend.LightningBackward(q2, k2, v2, decay, true, mid, do2, null, dq2, dk2, dv2, dMid);
        Backend.LightningBackward(q1, k1, v1, decay, true, ts0, do1, dMid, dq1, dk1, dv1, dS0);
        AssertClose(Part(edq, h * d, 0), dq1, "dQ chunk 1");
        AssertClose(Part(edq, h * d, 1), dq2, "dQ chunk 2");
        AssertClose(Part(edk, hk * d, 0), dk1, "dK chunk 1");
        AssertClose(Part(edk, hk * d, 1), dk2, "dK chunk 2");
        AssertClose(Part(edv, hk * dv, 0), dv1, "dV chunk 1");
        AssertClose(Part(edv, hk * dv, 1), dv2, "dV chunk 2");
        AssertClose(eds0, dS0, "dS0");
    }

    // ----- tensors and validation -------------------------------------------------------------------

    [Fact]
    public void CopySliceClearAndHostCopies_MoveTheRightElements()
    {
        var data = Enumerable.Range(0, 2 * 5 * 3).Select(i => (double)i).ToArray();
        using var src = Upload(data, 2, 5, 3);
        using var dst = Backend.Allocate(2, 4, 3);
        Backend.CopySlice(src, 1, dst, 2, 2, axis: 1);
        var got = Download(dst);
        for (int b = 0; b < 2; b++)
            for (int t = 0; t < 4; t++)
                for (int e = 0; e < 3; e++)
                {
                    float expected = t >= 2 ? (float)data[(b * 5 + (t - 2 + 1)) * 3 + e] : 0f;
                    Assert.Equal(expected, got[(b * 4 + t) * 3 + e]);
                }
        using var lse = Upload(Enumerable.Range(0, 2 * 3 * 6).Select(i => (double)i).ToArray(), 2, 3, 6);
        using var part = Backend.Allocate(2, 3, 2);
        Backend.CopySlice(lse, 4, part, 0, 2, axis: 2);
        Assert.Equal(new float[] { 4, 5, 10, 11, 16, 17, 22, 23, 28, 29, 34, 35 }, Download(part));
        var window = new float[3];
        src.CopyToHost(window, 7);
        Assert.Equal(new float[] { 7, 8, 9 }, window);
        src.CopyFromHost(new float[] { -1, -2 }, 28);
        Assert.Equal(-2f, Download(src)[29]);
        Backend.Clear(src);
        Assert.All(Download(src), f => Assert.Equal(0f, f));
        Assert.ThrowsAny<ArgumentException>(() => src.CopyToHost(new float[4], 28));
    }

    /// <summary>
    /// Bad arguments, one wrong thing each: the name of the scenario, the parameter names a correct message may
    /// blame, and the call. Shapes: Q [1,8,4,16], K/V [1,8,2,16], states [1,4,16,16].
    /// </summary>
    private static readonly Dictionary<string, (string[] Blame, Action<IKernelBackend> Call)> BadCalls = new()
    {
        ["FlashForward_HeadsNotDivisible"] = (["k"], be => be.FlashForward(T(be, 1, 8, 4, 16), T(be, 1, 8, 3, 16), T(be, 1, 8, 3, 16), T(be, 1, 8, 4, 16), T(be, 1, 4, 8), default)),
        ["FlashForward_KeyHeadDimDiffers"] = (["q", "k"], be => be.FlashForward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 32), T(be, 1, 8, 2, 16), T(be, 1, 8, 4, 16), T(be, 1, 4, 8), default)),
        ["FlashForward_ValueRowsDiffer"] = (["k", "v"], be => be.FlashForward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 7, 2, 16), T(be, 1, 8, 4, 16), T(be, 1, 4, 8), default)),
        ["FlashForward_WrongOutputShape"] = (["o"], be => be.FlashForward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 4, 8), T(be, 1, 4, 8), default)),
        ["FlashForward_WrongLseShape"] = (["lse"], be => be.FlashForward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 4, 16), T(be, 1, 8, 4), default)),
        ["FlashForward_QueryNot4D"] = (["q"], be => be.FlashForward(T(be, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 4, 16), T(be, 1, 4, 8), default)),
        ["FlashForward_TensorOfAnotherBackend"] = (["k"], be => be.FlashForward(T(be, 1, 8, 4, 16), new ForeignTensor(1, 8, 2, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 4, 16), T(be, 1, 4, 8), default)),
        ["SoftmaxRowDot_WrongDrowShape"] = (["drow"], be => be.SoftmaxRowDot(T(be, 1, 8, 4, 16), T(be, 1, 8, 4, 16), T(be, 1, 8, 4))),
        ["SoftmaxRowDot_GradientShapeDiffers"] = (["o", "dO"], be => be.SoftmaxRowDot(T(be, 1, 8, 4, 16), T(be, 1, 8, 4, 8), T(be, 1, 4, 8))),
        ["FlashBackward_WrongDrowShape"] = (["drow"], be => be.FlashBackward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), T(be, 1, 4, 8), T(be, 1, 4, 9), T(be, 1, 8, 4, 16), T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), default)),
        ["FlashBackward_WrongKeyGradientShape"] = (["dK"], be => be.FlashBackward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), T(be, 1, 4, 8), T(be, 1, 4, 8), T(be, 1, 8, 4, 16), T(be, 1, 8, 4, 16), T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), default)),
        ["FlashBackward_WrongValueGradientShape"] = (["dV"], be => be.FlashBackward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), T(be, 1, 4, 8), T(be, 1, 4, 8), T(be, 1, 8, 4, 16), T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 8), default)),
        ["MergeSoftmax_OtherOutputShapeDiffers"] = (["oA", "oB"], be => be.MergeSoftmax(T(be, 1, 8, 4, 16), T(be, 1, 4, 8), T(be, 1, 8, 4, 8), T(be, 1, 4, 8))),
        ["MergeSoftmax_OtherLseShapeDiffers"] = (["lseB"], be => be.MergeSoftmax(T(be, 1, 8, 4, 16), T(be, 1, 4, 8), T(be, 1, 8, 4, 16), T(be, 1, 4, 7))),
        ["LightningForward_DecayCountWrong"] = (["decay"], be => be.LightningForward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), [0.5f, 0.5f], true, null, T(be, 1, 8, 4, 16), null)),
        ["LightningForward_DecayAboveOne"] = (["decay"], be => be.LightningForward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), [1f, 1f, 1.5f, 1f], true, null, T(be, 1, 8, 4, 16), null)),
        ["LightningForward_DecayZero"] = (["decay"], be => be.LightningForward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), [1f, 0f, 1f, 1f], true, null, T(be, 1, 8, 4, 16), null)),
        ["LightningForward_KeyTokensDiffer"] = (["q", "k", "v"], be => be.LightningForward(T(be, 1, 8, 4, 16), T(be, 1, 6, 2, 16), T(be, 1, 6, 2, 16), Same(1f), true, null, T(be, 1, 8, 4, 16), null)),
        ["LightningForward_WrongS0Shape"] = (["s0"], be => be.LightningForward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), Same(1f), true, T(be, 1, 2, 16, 16), T(be, 1, 8, 4, 16), null)),
        ["LightningForward_WrongSEndShape"] = (["sEnd"], be => be.LightningForward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), Same(1f), true, null, T(be, 1, 8, 4, 16), T(be, 1, 4, 16, 8))),
        ["LightningBackward_WrongDS0Shape"] = (["dS0"], be => be.LightningBackward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), Same(0.9f), true, null, T(be, 1, 8, 4, 16), null, T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), T(be, 1, 4, 16, 15))),
        ["LightningBackward_WrongDSEndShape"] = (["dSEnd"], be => be.LightningBackward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), Same(0.9f), true, null, T(be, 1, 8, 4, 16), T(be, 2, 4, 16, 16), T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), null)),
        ["LightningBackward_WrongQueryGradientShape"] = (["dQ"], be => be.LightningBackward(T(be, 1, 8, 4, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), Same(0.9f), true, null, T(be, 1, 8, 4, 16), null, T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), null)),
        ["LightningChunkState_StateHeadsNotAMultiple"] = (["k", "m"], be => be.LightningChunkState(T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), [1f, 1f, 1f], true, T(be, 1, 3, 16, 16))),
        ["LightningChunkState_DecayCountWrong"] = (["decay"], be => be.LightningChunkState(T(be, 1, 8, 2, 16), T(be, 1, 8, 2, 16), [1f, 1f], true, T(be, 1, 4, 16, 16))),
        ["LightningChunkStateBackward_WrongStateShape"] = (["dM"], be => be.LightningChunkStateBackward(T(be, 1, 8, 4, 16), T(be, 1, 8, 4, 16), Same(1f), true, T(be, 1, 4, 16, 8))),
        ["CopySlice_RangePastTheEnd"] = (["srcStart", "dstStart", "count"], be => be.CopySlice(T(be, 2, 5, 3), 4, T(be, 2, 5, 3), 0, 2, 1)),
        ["CopySlice_AxisOutOfRange"] = (["axis"], be => be.CopySlice(T(be, 2, 5, 3), 0, T(be, 2, 5, 3), 0, 1, 3)),
        ["CopySlice_OtherDimsDiffer"] = (["source", "destination"], be => be.CopySlice(T(be, 2, 5, 3), 0, T(be, 2, 5, 4), 0, 1, 1)),
        ["CopyToHost_PastTheEnd"] = (["destination", "offset"], be => T(be, 2, 5, 3).CopyToHost(new float[4], 28)),
        ["CopyFromHost_NegativeOffset"] = (["source", "offset"], be => T(be, 2, 5, 3).CopyFromHost(new float[4], -1)),
    };

    public static TheoryData<string> BadCallNames() => [.. BadCalls.Keys];

    [ThreadStatic]
    private static List<DeviceTensor>? _scenarioTensors;

    private static DeviceTensor T(IKernelBackend backend, params int[] shape)
    {
        var t = backend.Allocate(shape);
        (_scenarioTensors ??= []).Add(t);
        return t;
    }

    [Theory]
    [MemberData(nameof(BadCallNames))]
    public void Validation_NamesTheWrongParameter(string scenario)
    {
        var (blame, call) = BadCalls[scenario];
        ArgumentException e;
        try
        {
            e = Assert.ThrowsAny<ArgumentException>(() => call(Backend));
        }
        finally
        {
            foreach (var t in _scenarioTensors ?? []) t.Dispose();
            _scenarioTensors?.Clear();
        }
        Assert.False(string.IsNullOrEmpty(e.ParamName), $"{scenario}: {e.GetType().Name} without ParamName: {e.Message}");
        Assert.True(blame.Contains(e.ParamName), $"{scenario}: ParamName '{e.ParamName}' should be one of [{string.Join(", ", blame)}]; message: {e.Message}");
    }

    [Fact]
    public void Validation_RightShapesPass()
    {
        // The same calls as the bad ones, with every shape right, must not throw (so the bad ones fail for their one reason).
        using var q = Backend.Allocate(1, 8, 4, 16);
        using var k = Backend.Allocate(1, 8, 2, 16);
        using var v = Backend.Allocate(1, 8, 2, 16);
        using var o = Backend.Allocate(1, 8, 4, 16);
        using var lse = Backend.Allocate(1, 4, 8);
        using var drow = Backend.Allocate(1, 4, 8);
        using var s = Backend.Allocate(1, 4, 16, 16);
        using var s2 = Backend.Allocate(1, 4, 16, 16);
        using var s3 = Backend.Allocate(1, 4, 16, 16);
        using var dq = Backend.Allocate(1, 8, 4, 16);
        using var dk = Backend.Allocate(1, 8, 2, 16);
        using var dv = Backend.Allocate(1, 8, 2, 16);
        Backend.FlashForward(q, k, v, o, lse, default);
        Backend.SoftmaxRowDot(o, o, drow);
        Backend.FlashBackward(q, k, v, lse, drow, o, dq, dk, dv, default);
        Backend.MergeSoftmax(o, lse, dq, drow);
        Backend.LightningForward(q, k, v, Same(0.9f), true, s, o, s2);
        Backend.LightningBackward(q, k, v, Same(0.9f), true, s, o, s2, dq, dk, dv, s3);
        Backend.LightningChunkState(k, v, Same(1f), true, s);
        Backend.LightningChunkStateBackward(q, o, Same(1f), true, s);
        Backend.Synchronize();
    }

    /// <summary>A tensor no backend allocated: operations must refuse it by name.</summary>
    private sealed class ForeignTensor(params int[] shape) : DeviceTensor(shape)
    {
        public override void CopyFromHost(ReadOnlySpan<float> source, long offset = 0) => throw new NotSupportedException();

        public override void CopyToHost(Span<float> destination, long offset = 0) => throw new NotSupportedException();
    }
}
