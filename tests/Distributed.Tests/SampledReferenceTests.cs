using Distributed.Cli.Check;
using Distributed.Cli.Run;
using Distributed.Reference;
using Xunit;
using Dims = Distributed.Reference.ReferenceAttention.Dims;

namespace Distributed.Tests;

/// <summary>
/// The sampled fp64 references of <c>dsattn run --check</c> against the naive full-tensor fp64 reference
/// (ReferenceAttention) on small shapes: every output and gradient at the sampled rows to ~1e-10 relative,
/// with N not a multiple of the block size, GQA, causal and non-causal, several decays. Plus the row
/// sampling policy and the comparison's failure rules.
/// </summary>
public sealed class SampledReferenceTests
{
    private const int B = 2, H = 4, Hk = 2, D = 8, Dv = 12;
    private const double Tolerance = 1e-10;

    private sealed record Inputs(Dims X, SampledDims Dims, double[] Q, double[] K, double[] V, double[] DO,
        ITokenRows QRows, ITokenRows KRows, ITokenRows VRows, ITokenRows DORows);

    private static Inputs Make(int n, double amplitude, int seed)
    {
        var x = new Dims(B, n, n, H, Hk, D, Dv);
        var q = ReferenceAttention.Random((long)B * n * H * D, seed, amplitude);
        var k = ReferenceAttention.Random((long)B * n * Hk * D, seed + 1, amplitude);
        var v = ReferenceAttention.Random((long)B * n * Hk * Dv, seed + 2);
        var dO = ReferenceAttention.Random((long)B * n * H * Dv, seed + 3);
        return new Inputs(x, new SampledDims(B, n, H, Hk, D, Dv), q, k, v, dO,
            Rows(q, n, H * D), Rows(k, n, Hk * D), Rows(v, n, Hk * Dv), Rows(dO, n, H * Dv));
    }

    // ReferenceAttention.Random values are fp32-representable, so the float copy is exact.
    private static ArrayTokenRows Rows(double[] a, int n, int width) => new(a.Select(x => (float)x).ToArray(), B, n, width);

    /// <summary>First, second, middle, block-edge, last-but-one and last rows of both batches, unsorted, one repeated.</summary>
    private static List<TokenRow> SampleRows(int n) =>
    [
        new(1, n - 1), new(0, 0), new(0, n / 2), new(1, 0), new(0, n - 1), new(1, 17 % n), new(0, 16),
        new(1, n / 3), new(0, 1), new(1, n - 2), new(0, 16), new(0, 15),
    ];

    /// <summary>max |actual − expected| / max |expected| over the sampled rows' slices of a global row-major tensor.</summary>
    private static double RowError(double[] sampled, double[] full, IReadOnlyList<TokenRow> rows, int n, int width)
    {
        Assert.Equal(rows.Count * width, sampled.Length);
        double maxErr = 0, maxRef = 0;
        for (int r = 0; r < rows.Count; r++)
            for (int c = 0; c < width; c++)
            {
                double e = full[(rows[r].Batch * (long)n + rows[r].Token) * width + c];
                maxErr = Math.Max(maxErr, Math.Abs(sampled[r * width + c] - e));
                maxRef = Math.Max(maxRef, Math.Abs(e));
            }
        Assert.True(maxRef > 0, "the expected slice is all zero");
        return maxErr / maxRef;
    }

    /// <summary>The same for a [B, H, N] row statistic sampled as [R, H].</summary>
    private static double StatError(double[] sampled, double[] full, IReadOnlyList<TokenRow> rows, Dims x)
    {
        double maxErr = 0, maxRef = 0;
        for (int r = 0; r < rows.Count; r++)
            for (int h = 0; h < x.H; h++)
            {
                double e = full[x.L(rows[r].Batch, h, checked((int)rows[r].Token))];
                maxErr = Math.Max(maxErr, Math.Abs(sampled[r * x.H + h] - e));
                maxRef = Math.Max(maxRef, Math.Abs(e));
            }
        return maxErr / Math.Max(maxRef, 1e-300);
    }

    public static TheoryData<int, bool, double, int> SoftmaxCases() => new()
    {
        { 37, true, 0, 16 }, { 37, false, 0, 16 }, { 300, true, 0, 16 }, { 300, false, 0.3, 64 },
        { 300, true, 0.3, SoftmaxSampledReference.DefaultBlockTokens }, { 37, false, 0, SoftmaxSampledReference.DefaultBlockTokens },
    };

    [Theory]
    [MemberData(nameof(SoftmaxCases))]
    public void Softmax_QueryAndKeyRows_MatchFullReference(int n, bool causal, double scale, int block)
    {
        var s = Make(n, 1.0, 11);
        var x = s.X;
        double sc = scale > 0 ? scale : 1.0 / Math.Sqrt(D);
        var (o, lse) = ReferenceAttention.FlashForward(s.Q, s.K, s.V, x, 0, 0, causal, sc);
        var (dq, dk, dv) = ReferenceAttention.FlashBackward(s.Q, s.K, s.V, s.DO, x, 0, 0, causal, sc);
        var drow = new double[lse.Length];
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++)
                for (int i = 0; i < n; i++)
                    for (int e = 0; e < Dv; e++)
                        drow[x.L(b, h, i)] += s.DO[x.O(b, i, h, e)] * o[x.O(b, i, h, e)];
        var rows = SampleRows(n);

        var qr = SoftmaxSampledReference.QueryRows(s.QRows, s.KRows, s.VRows, s.DORows, s.Dims, causal, scale, rows, block);
        Assert.Same(rows, qr.Rows);
        Assert.InRange(RowError(qr.O, o, rows, n, H * Dv), 0, Tolerance);
        Assert.InRange(StatError(qr.Lse!, lse, rows, x), 0, Tolerance);
        Assert.InRange(StatError(qr.Drow!, drow, rows, x), 0, Tolerance);
        Assert.InRange(RowError(qr.DQ!, dq, rows, n, H * D), 0, Tolerance);

        var forwardOnly = SoftmaxSampledReference.QueryRows(s.QRows, s.KRows, s.VRows, null, s.Dims, causal, scale, rows, block);
        Assert.Null(forwardOnly.DQ);
        Assert.Null(forwardOnly.Drow);
        Assert.Equal(qr.O, forwardOnly.O);
        Assert.Equal(qr.Lse, forwardOnly.Lse);

        var kr = SoftmaxSampledReference.KeyRows(s.QRows, s.DORows, s.KRows, s.VRows, new ArrayRowValues(lse, B, H, n),
            new ArrayRowValues(drow, B, H, n), s.Dims, causal, scale, rows, block);
        Assert.InRange(RowError(kr.DK, dk, rows, n, Hk * D), 0, Tolerance);
        Assert.InRange(RowError(kr.DV, dv, rows, n, Hk * Dv), 0, Tolerance);
    }

    public static TheoryData<int, bool, float[], int> LightningCases() => new()
    {
        { 37, true, [0.9f, 0.9f, 0.9f, 0.9f], 16 },
        { 300, true, [0.9f, 0.9f, 0.9f, 0.9f], 16 },
        { 300, true, [0.5f, 0.5f, 0.5f, 0.5f], 64 },
        { 300, true, [1f, 1f, 1f, 1f], 16 },
        { 37, true, [1f, 0.99f, 0.9f, 0.5f], 16 },
        { 300, true, [1f, 0.99f, 0.9f, 0.5f], LightningSampledReference.DefaultBlockTokens },
        { 300, true, [], 64 },
        { 37, false, [0.9f, 0.9f, 0.9f, 0.9f], 16 },
        { 300, false, [1f, 0.99f, 0.9f, 0.5f], 64 },
    };

    [Theory]
    [MemberData(nameof(LightningCases))]
    public void Lightning_QueryAndKeyRows_MatchFullReference(int n, bool causal, float[] decay, int block)
    {
        var s = Make(n, 0.25, 23);
        var lambda = decay.Length == 0 ? Enumerable.Repeat(1.0, H).ToArray() : decay.Select(d => (double)d).ToArray();
        var (o, _) = ReferenceAttention.LightningForward(s.Q, s.K, s.V, lambda, causal, null, s.X);
        var (dq, dk, dv, _) = ReferenceAttention.LightningBackward(s.Q, s.K, s.V, lambda, causal, null, s.DO, null, s.X);
        var rows = SampleRows(n);

        var qr = LightningSampledReference.QueryRows(s.QRows, s.KRows, s.VRows, s.DORows, s.Dims, decay, causal, rows, block);
        Assert.Null(qr.Lse);
        Assert.InRange(RowError(qr.O, o, rows, n, H * Dv), 0, Tolerance);
        Assert.InRange(RowError(qr.DQ!, dq, rows, n, H * D), 0, Tolerance);

        var forwardOnly = LightningSampledReference.QueryRows(s.QRows, s.KRows, s.VRows, null, s.Dims, decay, causal, rows, block);
        Assert.Null(forwardOnly.DQ);
        Assert.Equal(qr.O, forwardOnly.O);

        var kr = LightningSampledReference.KeyRows(s.QRows, s.KRows, s.VRows, s.DORows, s.Dims, decay, causal, rows, block);
        Assert.InRange(RowError(kr.DK, dk, rows, n, Hk * D), 0, Tolerance);
        Assert.InRange(RowError(kr.DV, dv, rows, n, Hk * Dv), 0, Tolerance);
    }

    /// <summary>Counts what a reference reads: the largest single read and the tokens read in all.</summary>
    private sealed class CountingRows(ITokenRows inner) : ITokenRows
    {
        public int MaxCount { get; private set; }
        public long Tokens { get; private set; }
        public int Batch => inner.Batch;
        public long SeqLen => inner.SeqLen;
        public int Width => inner.Width;

        public void Read(int batch, long tokenStart, int count, Span<float> destination)
        {
            lock (this)
            {
                MaxCount = Math.Max(MaxCount, count);
                Tokens += count;
            }
            inner.Read(batch, tokenStart, count, destination);
        }
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void References_StreamInBlocks_AndStopAtTheSampledRowsWhenCausal(bool causal)
    {
        const int n = 300, block = 32;
        var s = Make(n, 0.25, 3);
        List<TokenRow> rows = [new(0, 40), new(0, 100), new(1, 70)];
        var q = new CountingRows(s.QRows);
        var k = new CountingRows(s.KRows);
        var v = new CountingRows(s.VRows);
        var dO = new CountingRows(s.DORows);
        LightningSampledReference.QueryRows(q, k, v, dO, s.Dims, [0.9f, 0.9f, 0.9f, 0.9f], causal, rows, block);
        // Causal: keys 0..100 of batch 0 and 0..70 of batch 1; non-causal: every key of both batches.
        Assert.Equal(causal ? 101 + 71 : 2 * n, k.Tokens);
        Assert.Equal(3, q.Tokens); // only the sampled query rows
        SoftmaxSampledReference.QueryRows(q, k, v, dO, s.Dims, causal, 0, rows, block);
        LightningSampledReference.KeyRows(q, k, v, dO, s.Dims, [0.9f, 0.9f, 0.9f, 0.9f], causal, rows, block);
        long before = q.Tokens;
        var zeros = new ArrayRowValues(new double[B * H * n], B, H, n);
        SoftmaxSampledReference.KeyRows(q, dO, k, v, zeros, zeros, s.Dims, causal, 0, rows, block);
        // Causal: queries 40..299 of batch 0 and 70..299 of batch 1.
        Assert.Equal(causal ? (n - 40) + (n - 70) : 2 * n, q.Tokens - before);
        foreach (var t in new[] { q, k, v, dO }) Assert.InRange(t.MaxCount, 1, block);
    }

    [Fact]
    public void References_GiveEmptyResults_ForNoRows()
    {
        var s = Make(37, 0.25, 3);
        var qr = LightningSampledReference.QueryRows(s.QRows, s.KRows, s.VRows, s.DORows, s.Dims, [], true, []);
        Assert.Empty(qr.O);
        Assert.Empty(qr.DQ!);
        var kr = SoftmaxSampledReference.KeyRows(s.QRows, s.DORows, s.KRows, s.VRows, new ArrayRowValues(new double[B * H * 37], B, H, 37),
            new ArrayRowValues(new double[B * H * 37], B, H, 37), s.Dims, false, 0, []);
        Assert.Empty(kr.DK);
        Assert.False(CheckComparison.Of("dK", [], kr.DK).Passed(1.0));
    }

    [Fact]
    public void Lightning_RejectsDecayOutsideRangeOrOfWrongLength()
    {
        var s = Make(37, 0.25, 5);
        List<TokenRow> rows = [new(0, 3)];
        Assert.Throws<ArgumentOutOfRangeException>(() =>
            LightningSampledReference.QueryRows(s.QRows, s.KRows, s.VRows, null, s.Dims, [0.9f, 0f, 1f, 1f], true, rows));
        Assert.Throws<ArgumentException>(() =>
            LightningSampledReference.KeyRows(s.QRows, s.KRows, s.VRows, s.DORows, s.Dims, [0.9f, 0.9f], true, rows));
        Assert.Throws<ArgumentOutOfRangeException>(() =>
            LightningSampledReference.QueryRows(s.QRows, s.KRows, s.VRows, null, s.Dims, [], true, [new(2, 0)]));
        Assert.Throws<ArgumentException>(() =>
            LightningSampledReference.QueryRows(s.KRows, s.KRows, s.VRows, null, s.Dims, [], true, rows));
    }

    [Fact]
    public void SyntheticTokenRows_MatchSyntheticInputsValue()
    {
        const int n = 300, width = 24;
        const ulong seed = 42;
        var full = new float[B * n * width];
        for (int i = 0; i < full.Length; i++) full[i] = 0.25f * SyntheticInputs.Value(seed, SyntheticInputs.Key, i);
        var rows = new SyntheticTokenRows(seed, SyntheticInputs.Key, B, n, width, 0.25f);
        var array = new ArrayTokenRows(full, B, n, width);
        var got = new float[37 * width];
        var want = new float[37 * width];
        foreach (var (b, start, count) in new[] { (0, 0L, 37), (1, 263L, 37), (1, 100L, 5) })
        {
            rows.Read(b, start, count, got);
            array.Read(b, start, count, want);
            Assert.Equal(want.AsSpan(0, count * width).ToArray(), got.AsSpan(0, count * width).ToArray());
            Assert.Equal(full.AsSpan((int)((b * n + start) * width), count * width).ToArray(), got.AsSpan(0, count * width).ToArray());
        }
        Assert.Throws<ArgumentOutOfRangeException>(() => rows.Read(0, 290, 11, got));
        Assert.Throws<ArgumentOutOfRangeException>(() => array.Read(2, 0, 1, got));
    }

    [Fact]
    public void ArrayRowValues_ReadsBhnRows()
    {
        var values = Enumerable.Range(0, 2 * 3 * 5).Select(i => (double)i).ToArray();
        var d = new ArrayRowValues(values, 2, 3, 5);
        var f = new ArrayRowValues(values.Select(x => (float)x).ToArray(), 2, 3, 5);
        var a = new double[3];
        var c = new double[3];
        d.Read(1, 2, 1, 3, a);
        f.Read(1, 2, 1, 3, c);
        Assert.Equal(new double[] { 26, 27, 28 }, a);
        Assert.Equal(a, c);
        Assert.Throws<ArgumentOutOfRangeException>(() => d.Read(0, 3, 0, 1, a));
    }

    [Theory]
    [InlineData(ShardLayout.Zigzag, 4, 2)]
    [InlineData(ShardLayout.Contiguous, 3, 2)]
    [InlineData(ShardLayout.Zigzag, 2, 1)]
    public void SampledRows_CoverRangeEnds_AreDeterministicDistinctSorted_WithRightLocalIndices(ShardLayout layout, int ranks, int batch)
    {
        const int n = 300, extra = 10;
        for (int rank = 0; rank < ranks; rank++)
        {
            var ranges = Sharding.Ranges(n, ranks, rank, layout);
            ulong seed = 1234 + (ulong)rank;
            var rows = SampledRows.Choose(ranges, batch, seed, extra);

            // Deterministic from the seed; another seed draws other rows.
            Assert.Equal(rows, SampledRows.Choose(ranges, batch, seed, extra));
            Assert.NotEqual(rows, SampledRows.Choose(ranges, batch, seed + 100, extra));

            // Sorted by (batch, token) and distinct.
            for (int r = 1; r < rows.Count; r++)
                Assert.True(rows[r - 1].Batch < rows[r].Batch || (rows[r - 1].Batch == rows[r].Batch && rows[r - 1].Token < rows[r].Token),
                    $"rows {r - 1} and {r} are out of order or repeated: {rows[r - 1]}, {rows[r]}");

            // Local index = position in the concatenation of the ranges.
            var local = ranges.SelectMany(x => Enumerable.Range(x.Start, x.Count)).ToList();
            foreach (var row in rows)
            {
                Assert.InRange(row.Batch, 0, batch - 1);
                Assert.Equal(row.Token, local[row.LocalToken]);
                Assert.Equal((long)row.Batch * local.Count + row.LocalToken, row.LocalRowIndex(local.Count));
                Assert.Equal(new TokenRow(row.Batch, row.Token), row.Row);
            }

            // First and last token of every range, in batch 0 and batch B−1.
            var ends = new HashSet<TokenRow>();
            foreach (var (start, count) in ranges)
                foreach (int b in new[] { 0, batch - 1 })
                {
                    ends.Add(new(b, start));
                    ends.Add(new(b, start + count - 1));
                }
            var set = rows.Select(r => r.Row).ToHashSet();
            Assert.Subset(set, ends);
            Assert.Equal(ends.Count + extra, rows.Count);
        }
    }

    [Fact]
    public void SampledRows_RefuseOverlappingRanges_AndStopWhenRangesAreExhausted()
    {
        Assert.Throws<ArgumentException>(() => SampledRows.Choose([(0, 10), (5, 10)], 1, 1, 40));
        var all = SampledRows.Choose([(3, 4)], 2, 9, 100);
        Assert.Equal(8, all.Count); // 4 tokens × 2 batches, every one drawn
        Assert.Equal([3L, 4, 5, 6, 3, 4, 5, 6], all.Select(r => r.Token));
    }

    [Fact]
    public void CheckComparison_PassesWithinTolerance_AndReportsErrors()
    {
        var c = CheckComparison.Of("O", [1f, -2f, 0.5f], [1.0, -2.0, 0.5 + 1e-7]);
        Assert.Equal(3, c.Elements);
        Assert.Equal(2.0, c.MaxAbsReference);
        Assert.Equal(1e-7, c.MaxAbsError, 1e-12);
        Assert.Equal(c.MaxAbsError / 2.0, c.RelativeError);
        Assert.True(c.Passed(1e-6));
        Assert.Null(c.Failure(1e-6));
        Assert.False(c.Passed(1e-9));
        Assert.Contains("above the tolerance", c.Failure(1e-9));
        var result = c.ToResult(1e-6);
        Assert.True(result.Passed);
        Assert.Equal("O", result.Tensor);
        Assert.Equal(c.RelativeError, result.RelativeError);
    }

    [Theory]
    [InlineData(float.NaN)]
    [InlineData(float.PositiveInfinity)]
    [InlineData(float.NegativeInfinity)]
    public void CheckComparison_FailsOnNonFiniteRunValues(float bad)
    {
        var c = CheckComparison.Of("dK", [1f, bad, 0.5f], [1.0, 7.0, 0.5]);
        Assert.Equal(1, c.NonFinite);
        Assert.Equal(1, c.FirstNonFinite);
        Assert.False(c.Passed(double.PositiveInfinity));
        Assert.Contains("NaN or Inf", c.Failure(1.0));
        var result = c.ToResult(1.0);
        Assert.False(result.Passed);
        Assert.True(double.IsNaN(result.RelativeError));

        // Merged into a clean comparison of another rank, it still fails and points at the right element.
        var merged = CheckComparison.Of("dK", [2f, 3f], [2.0, 3.0]);
        merged.Merge(c);
        Assert.False(merged.Passed(1.0));
        Assert.Equal(3, merged.FirstNonFinite);
        Assert.Equal(5, merged.Elements);
    }

    [Fact]
    public void CheckComparison_FailsWhenNothingWasCompared_OrTheReferenceIsBroken()
    {
        var empty = CheckComparison.Of("dV", [], []);
        Assert.False(empty.Passed(double.PositiveInfinity));
        Assert.Contains("no element", empty.Failure(1.0));
        Assert.False(empty.ToResult(1.0).Passed);
        empty.Merge(new CheckComparison("dV"));
        Assert.False(empty.Passed(1.0));

        Assert.False(CheckComparison.Of("O", [1f], [double.NaN]).Passed(1.0));
        Assert.Throws<ArgumentException>(() => CheckComparison.Of("O", [1f], [1.0, 2.0]));
    }
}
