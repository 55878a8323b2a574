using System.Buffers.Binary;
using System.Text;
using Distributed.IO;
using Xunit;

namespace Distributed.Tests;

/// <summary>
/// The .npy layer: files built byte-for-byte as NumPy writes them (formats 1.0, 2.0, 3.0; &lt;f4 and &lt;f2) read
/// back exactly, NpyWriter output in NumPy's exact header format, every kind of bad file refused with a message
/// naming the file and the problem, token-range reads and writes against an in-memory computation, and element
/// offsets past 2^32 bytes in sparse files.
/// </summary>
public sealed class NpyTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("npytests-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string PathOf(string name) => Path.Combine(_dir, name);

    /// <summary>
    /// The .npy bytes NumPy writes: magic, version, little-endian header length (2 bytes for 1.0, 4 for 2.0/3.0),
    /// the dict text padded with spaces and a newline so the whole header is a multiple of 64 bytes, then data.
    /// </summary>
    internal static byte[] NumpyBytes(int major, string dict, ReadOnlySpan<byte> data, int minor = 0)
    {
        int lengthSize = major == 1 ? 2 : 4;
        byte[] text = major == 3 ? Encoding.UTF8.GetBytes(dict) : Encoding.Latin1.GetBytes(dict);
        int pad = 64 - ((8 + lengthSize + text.Length + 1) % 64);
        int headerLength = text.Length + pad + 1;
        var bytes = new List<byte> { 0x93, (byte)'N', (byte)'U', (byte)'M', (byte)'P', (byte)'Y', (byte)major, (byte)minor };
        var len = new byte[lengthSize];
        if (major == 1)
            BinaryPrimitives.WriteUInt16LittleEndian(len, (ushort)headerLength);
        else
            BinaryPrimitives.WriteUInt32LittleEndian(len, (uint)headerLength);
        bytes.AddRange(len);
        bytes.AddRange(text);
        bytes.AddRange(Enumerable.Repeat((byte)' ', pad));
        bytes.Add((byte)'\n');
        Assert.Equal(0, bytes.Count % 64);
        bytes.AddRange(data.ToArray());
        return bytes.ToArray();
    }

    internal static string Dict(string descr, string shape, bool fortran = false) =>
        $"{{'descr': '{descr}', 'fortran_order': {(fortran ? "True" : "False")}, 'shape': {shape}, }}";

    private static byte[] F4Bytes(float[] values)
    {
        var b = new byte[values.Length * 4];
        for (int i = 0; i < values.Length; i++)
            BinaryPrimitives.WriteSingleLittleEndian(b.AsSpan(i * 4), values[i]);
        return b;
    }

    private static byte[] F2Bytes(Half[] values)
    {
        var b = new byte[values.Length * 2];
        for (int i = 0; i < values.Length; i++)
            BinaryPrimitives.WriteHalfLittleEndian(b.AsSpan(i * 2), values[i]);
        return b;
    }

    private static float[] RandomFloats(int n, int seed)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, n).Select(_ => (float)(rng.NextDouble() * 20 - 10)).ToArray();
    }

    private string WriteFile(string name, byte[] bytes)
    {
        string path = PathOf(name);
        File.WriteAllBytes(path, bytes);
        return path;
    }

    private static float[] ReadAll(string path)
    {
        using var r = NpyReader.Open(path);
        var all = new float[r.Header.ElementCount];
        r.Read(0, all);
        return all;
    }

    // ---- round trips -------------------------------------------------------------------------------------

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    public void Open_Float32EachVersion_ReadsHeaderAndValues(int major)
    {
        float[] values = RandomFloats(6, 11 + major);
        string path = WriteFile($"f4v{major}.npy", NumpyBytes(major, Dict("<f4", "(2, 3)"), F4Bytes(values)));

        using var r = NpyReader.Open(path);
        Assert.Equal(path, r.Header.Path);
        Assert.Equal(NpyDType.Float32, r.Header.DType);
        Assert.Equal([2L, 3L], r.Header.Shape);
        Assert.Equal((major, 0), r.Header.Version);
        Assert.Equal(6, r.Header.ElementCount);
        Assert.Equal(4, r.Header.ElementSize);
        Assert.Equal(0, r.Header.DataOffset % 64);
        Assert.Equal(new FileInfo(path).Length - 24, r.Header.DataOffset);
        var all = new float[6];
        r.Read(0, all);
        Assert.Equal(values, all);
        var tail = new float[2];
        r.Read(4, tail);
        Assert.Equal(values[4..], tail);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    public void Open_Float16EachVersion_ConvertsExactlyToFloat32(int major)
    {
        float[] exact = [0.5f, -1.25f, 65504f, -65504f, 0f, -0f, MathF.Pow(2, -24), 3 * MathF.Pow(2, -24), 1023 * MathF.Pow(2, -24), MathF.Pow(2, -14), float.PositiveInfinity, 1f];
        var rng = new Random(7 + major);
        Half[] random = Enumerable.Range(0, 500).Select(_ => (Half)(rng.NextDouble() * 200 - 100)).ToArray();
        Half[] halves = [.. exact.Select(f => (Half)f), .. random];
        Assert.All(exact, f => Assert.Equal(f, (float)(Half)f)); // the chosen values are representable
        string path = WriteFile($"f2v{major}.npy", NumpyBytes(major, Dict("<f2", $"({halves.Length},)"), F2Bytes(halves)));

        using var r = NpyReader.Open(path);
        Assert.Equal(NpyDType.Float16, r.Header.DType);
        Assert.Equal(2, r.Header.ElementSize);
        Assert.Equal([(long)halves.Length], r.Header.Shape);
        var all = new float[halves.Length];
        r.Read(0, all);
        for (int i = 0; i < exact.Length; i++)
            Assert.Equal(BitConverter.SingleToInt32Bits(exact[i]), BitConverter.SingleToInt32Bits(all[i]));
        for (int i = 0; i < random.Length; i++)
            Assert.Equal((float)random[i], all[exact.Length + i]);
        var mid = new float[3];
        r.Read(exact.Length + 100, mid);
        Assert.Equal(random[100..103].Select(h => (float)h), mid);
    }

    [Fact]
    public void Open_Float16LargerThanStagingBuffer_ConvertsEveryPiece()
    {
        var rng = new Random(5);
        Half[] halves = Enumerable.Range(0, 100_003).Select(_ => (Half)(rng.NextDouble() * 2 - 1)).ToArray();
        string path = WriteFile("bigf2.npy", NumpyBytes(1, Dict("<f2", $"({halves.Length},)"), F2Bytes(halves)));
        Assert.Equal(halves.Select(h => (float)h), ReadAll(path));
    }

    [Theory]
    [InlineData("()", new long[0], 1)]
    [InlineData("(5,)", new long[] { 5 }, 5)]
    [InlineData("(0, 4)", new long[] { 0, 4 }, 0)]
    [InlineData("(1, 2, 1, 3)", new long[] { 1, 2, 1, 3 }, 6)]
    public void Open_ShapesOfAnyRank_ParseAndCount(string shapeText, long[] shape, long count)
    {
        string path = WriteFile("s.npy", NumpyBytes(1, Dict("<f4", shapeText), F4Bytes(RandomFloats((int)count, 3))));
        using var r = NpyReader.Open(path);
        Assert.Equal(shape, r.Header.Shape);
        Assert.Equal(count, r.Header.ElementCount);
        Assert.Equal(shapeText, r.Header.ShapeText);
    }

    [Theory]
    [InlineData("{\"descr\":\"<f4\",\"fortran_order\":False,\"shape\":(2,3)}")]
    [InlineData("{'shape': (2L, 3L), 'fortran_order': False, 'descr': 'f4'}")]
    [InlineData("{'descr': '|f4', 'fortran_order': False, 'shape': (2, 3,), }")]
    public void Open_OtherValidSpellings_Parse(string dict)
    {
        float[] values = RandomFloats(6, 9);
        string path = WriteFile("spell.npy", NumpyBytes(1, dict, F4Bytes(values)));
        using var r = NpyReader.Open(path);
        Assert.Equal([2L, 3L], r.Header.Shape);
        Assert.Equal(NpyDType.Float32, r.Header.DType);
        Assert.Equal(values, ReadAll(path));
    }

    /// <summary>The header NumPy's <c>_write_array_header</c> writes (sorted keys, growth-axis padding, 64-byte alignment).</summary>
    private static byte[] NumpySaveHeader(string shapeText, long firstDim)
    {
        string dict = Dict("<f4", shapeText) + new string(' ', Math.Max(0, 21 - firstDim.ToString(System.Globalization.CultureInfo.InvariantCulture).Length));
        return NumpyBytes(1, dict, []);
    }

    [Theory]
    [InlineData(new long[] { 2, 3 }, "(2, 3)")]
    [InlineData(new long[] { 5 }, "(5,)")]
    [InlineData(new long[] { 2, 100, 8, 64 }, "(2, 100, 8, 64)")]
    public void Create_HeaderIsExactlyWhatNumpySaveWrites(long[] shape, string shapeText)
    {
        string path = PathOf("w.npy");
        long count = shape.Aggregate(1L, (a, b) => a * b);
        using (var w = NpyWriter.Create(path, shape))
        {
            Assert.Equal((1, 0), w.Header.Version);
            Assert.Equal(0, w.Header.DataOffset % 64);
        }

        byte[] bytes = File.ReadAllBytes(path);
        Assert.Equal([0x93, (byte)'N', (byte)'U', (byte)'M', (byte)'P', (byte)'Y', 1, 0], bytes[..8]);
        int headerLength = BinaryPrimitives.ReadUInt16LittleEndian(bytes.AsSpan(8));
        int dataOffset = 10 + headerLength;
        Assert.Equal(0, dataOffset % 64);
        string text = Encoding.ASCII.GetString(bytes, 10, headerLength);
        Assert.StartsWith($"{{'descr': '<f4', 'fortran_order': False, 'shape': {shapeText}, }}", text);
        Assert.EndsWith("\n", text);
        Assert.Equal(dataOffset + count * 4, bytes.Length);
        Assert.Equal(NumpySaveHeader(shapeText, shape[0]), bytes[..dataOffset]);
        Assert.Equal(128, dataOffset); // numpy.save's header for these shapes
        Assert.All(bytes[dataOffset..], b => Assert.Equal(0, b));
    }

    [Fact]
    public void Create_ScalarShape_WritesEmptyTuple()
    {
        string path = PathOf("scalar.npy");
        using (var w = NpyWriter.Create(path, []))
            w.Write(0, [2.5f]);
        Assert.Equal(NumpyBytes(1, Dict("<f4", "()"), F4Bytes([2.5f])), File.ReadAllBytes(path));
        Assert.Equal([2.5f], ReadAll(path));
    }

    [Fact]
    public void Create_HeaderOver64KiB_UsesVersion2AndReadsBack()
    {
        long[] shape = Enumerable.Repeat(1L, 22_000).ToArray();
        string path = PathOf("v2.npy");
        using (var w = NpyWriter.Create(path, shape))
        {
            Assert.Equal((2, 0), w.Header.Version);
            w.Write(0, [7f]);
        }
        byte[] head = File.ReadAllBytes(path)[..12];
        Assert.Equal(2, head[6]);
        using var r = NpyReader.Open(path);
        Assert.Equal((2, 0), r.Header.Version);
        Assert.Equal(shape, r.Header.Shape);
        Assert.Equal(0, r.Header.DataOffset % 64);
        Assert.Equal([7f], ReadAll(path));
    }

    [Fact]
    public void CreateThenOpen_TwoWritersFillDisjointParts_ReaderSeesBoth()
    {
        string path = PathOf("two.npy");
        float[] values = RandomFloats(2 * 7 * 5, 21);
        using (var first = NpyWriter.Create(path, [2, 7, 5]))
        {
            first.Write(0, values.AsSpan(0, 33));
            using var second = NpyWriter.Open(path);
            Assert.Equal(first.Header.DataOffset, second.Header.DataOffset);
            second.Write(33, values.AsSpan(33));
            second.Flush(toDisk: true);
            first.Flush();
        }
        Assert.Equal(values, ReadAll(path));
    }

    [Fact]
    public void Read_OutsideTheArray_Throws()
    {
        string path = WriteFile("small.npy", NumpyBytes(1, Dict("<f4", "(4,)"), F4Bytes([1, 2, 3, 4])));
        using var r = NpyReader.Open(path);
        Assert.Throws<ArgumentOutOfRangeException>(() => r.Read(2, new float[3]));
        Assert.Throws<ArgumentOutOfRangeException>(() => r.Read(-1, new float[1]));
        var last = new float[1];
        r.Read(3, last);
        Assert.Equal(4f, last[0]);
    }

    // ---- bad files ---------------------------------------------------------------------------------------

    private static NpyFormatException Refused(string path, NpyProblem problem, params string[] fragments)
    {
        var e = Assert.Throws<NpyFormatException>(() => NpyReader.Open(path).Dispose());
        Assert.Equal(problem, e.Problem);
        Assert.Equal(path, e.FilePath);
        Assert.Contains(path, e.Message, StringComparison.Ordinal);
        foreach (string f in fragments)
            Assert.Contains(f, e.Message, StringComparison.Ordinal);
        return e;
    }

    [Fact]
    public void Open_MissingFile_SaysItDoesNotExist()
    {
        Refused(PathOf("nope.npy"), NpyProblem.Missing, "does not exist");
        Refused(PathOf("nodir/nope.npy"), NpyProblem.Missing, "does not exist");
    }

    [Fact]
    public void Open_FolderInsteadOfFile_IsUnreadable() =>
        Refused(_dir, NpyProblem.Unreadable, "cannot be read");

    [Theory]
    [InlineData(new byte[0], "empty")]
    [InlineData(new byte[] { (byte)'P', (byte)'K', 3, 4, 0, 0, 0, 0, 0, 0, 0, 0 }, "504B03040000")]
    public void Open_WrongMagic_SaysNotNpy(byte[] bytes, string found)
    {
        string path = WriteFile("magic.npy", bytes);
        Refused(path, NpyProblem.BadMagic, "is not a .npy file", "magic", found);
    }

    [Theory]
    [InlineData(4, 0, "4.0")]
    [InlineData(1, 1, "1.1")]
    public void Open_UnsupportedVersion_NamesIt(int major, int minor, string shown)
    {
        string path = WriteFile("ver.npy", NumpyBytes(major == 4 ? 2 : 1, Dict("<f4", "(1,)"), F4Bytes([1]), minor));
        byte[] bytes = File.ReadAllBytes(path);
        bytes[6] = (byte)major;
        File.WriteAllBytes(path, bytes);
        Refused(path, NpyProblem.UnsupportedVersion, $"version {shown}", "1.0, 2.0 and 3.0");
    }

    [Theory]
    [InlineData("'>f4'", "'>f4' (big-endian)")]
    [InlineData("'<f8'", "'<f8'")]
    [InlineData("'<i4'", "'<i4'")]
    [InlineData("'|u1'", "'|u1'")]
    [InlineData("[('a', '<f4')]", "structured")]
    public void Open_UnsupportedDType_SaysWhichWasFound(string descr, string shown)
    {
        string dict = $"{{'descr': {descr}, 'fortran_order': False, 'shape': (2,), }}";
        string path = WriteFile("dtype.npy", NumpyBytes(1, dict, new byte[16]));
        Refused(path, NpyProblem.UnsupportedDType, "has dtype", shown, "'<f4'", "'<f2'", "astype");
    }

    [Fact]
    public void Open_FortranOrder_IsRefusedWithTheFix()
    {
        string path = WriteFile("fortran.npy", NumpyBytes(1, Dict("<f4", "(2, 3)", fortran: true), new byte[24]));
        Refused(path, NpyProblem.FortranOrder, "Fortran", "ascontiguousarray");
    }

    [Theory]
    [InlineData("<f4", 4)]
    [InlineData("<f2", 2)]
    public void Open_TruncatedData_GivesBothSizes(string descr, int size)
    {
        byte[] full = NumpyBytes(3, Dict(descr, "(10, 3)"), new byte[30 * size]);
        string path = WriteFile("trunc.npy", full[..^5]);
        Refused(path, NpyProblem.Truncated, "truncated", $"{full.Length} bytes", $"only {full.Length - 5} bytes");
    }

    [Theory]
    [InlineData("{'descr': '<f4', 'fortran_order': False}", "'shape' is missing")]
    [InlineData("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'extra': 1}", "unexpected key 'extra'")]
    [InlineData("{'descr': '<f4', 'fortran_order': False, 'shape': [2, 3]}", "not a tuple")]
    [InlineData("{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3)}", "non-negative")]
    [InlineData("{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3)}", "'fortran_order' is 0")]
    [InlineData("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)", "expected ','")]
    [InlineData("not a dict", "expected '{'")]
    [InlineData("{'descr': '<f4', 'fortran_order': Nope, 'shape': (2, 3)}", "unknown name 'Nope'")]
    [InlineData("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}", "not a 64-bit integer")]
    public void Open_MalformedHeader_SaysWhatIsWrong(string dict, string what)
    {
        string path = WriteFile("malformed.npy", NumpyBytes(1, dict, new byte[24]));
        Refused(path, NpyProblem.MalformedHeader, "malformed .npy header", what);
    }

    [Fact]
    public void Open_HeaderLengthPastEndOfFile_IsMalformed()
    {
        byte[] bytes = NumpyBytes(1, Dict("<f4", "(1,)"), F4Bytes([1]));
        BinaryPrimitives.WriteUInt16LittleEndian(bytes.AsSpan(8), 60_000);
        string path = WriteFile("hlen.npy", bytes);
        Refused(path, NpyProblem.MalformedHeader, "header ends at byte 60010", $"only {bytes.Length} bytes");
    }

    [Fact]
    public void Open_Version3InvalidUtf8_IsMalformed()
    {
        byte[] bytes = NumpyBytes(3, Dict("<f4", "(1,)"), F4Bytes([1]));
        bytes[12] = 0xFF; // inside 'descr'
        string path = WriteFile("utf8.npy", bytes);
        Refused(path, NpyProblem.MalformedHeader, "not valid UTF-8");
    }

    [Fact]
    public void OpenWriter_Float16File_IsRefused()
    {
        string path = WriteFile("f2.npy", NumpyBytes(1, Dict("<f2", "(2,)"), new byte[4]));
        var e = Assert.Throws<NpyFormatException>(() => NpyWriter.Open(path).Dispose());
        Assert.Equal(NpyProblem.UnsupportedDType, e.Problem);
        Assert.Contains(path, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ExpectRankAndShape_Mismatch_NamesOptionFileShapeAndLayout()
    {
        string path = WriteFile("Q.npy", NumpyBytes(1, Dict("<f4", "(2, 100, 8)"), new byte[1600 * 4]));
        using var r = NpyReader.Open(path);
        var e = Assert.Throws<NpyFormatException>(() => r.Header.ExpectRank(4, "--q", "[B, N, H, D]"));
        Assert.Equal(NpyProblem.WrongShape, e.Problem);
        Assert.Equal($"--q {path} has shape (2, 100, 8) but must be 4-D [B, N, H, D].", e.Message);
        r.Header.ExpectRank(3, "--q", "[B, N, H·D]");

        e = Assert.Throws<NpyFormatException>(() => r.Header.ExpectShape("--lse", "[B, N, H]", 2, -1, 4));
        Assert.Equal($"--lse {path} has shape (2, 100, 8) but must be [B, N, H] = (2, *, 4).", e.Message);
        r.Header.ExpectShape("--lse", "[B, N, H]", 2, -1, 8);
    }

    // ---- token ranges ------------------------------------------------------------------------------------

    /// <summary>The rows of <paramref name="ranges"/> out of a global <c>[outer, seqLen, inner]</c> array, computed directly.</summary>
    private static float[] Take(float[] global, int outer, int seqLen, int inner, IReadOnlyList<(int Start, int Count)> ranges)
    {
        var local = new List<float>();
        for (int o = 0; o < outer; o++)
            foreach (var (start, count) in ranges)
                for (int t = start; t < start + count; t++)
                    for (int i = 0; i < inner; i++)
                        local.Add(global[(o * seqLen + t) * inner + i]);
        return local.ToArray();
    }

    [Theory]
    [InlineData(2, 13, 6, "<f4")] // Q-like: outer = B, inner = H·D
    [InlineData(2, 13, 6, "<f2")]
    [InlineData(6, 17, 1, "<f4")] // LSE-like: outer = B·H, inner = 1
    public void ReadTokenRanges_ZigzagRanges_MatchDirectComputation(int outer, int seqLen, int inner, string descr)
    {
        int n = outer * seqLen * inner;
        float[] global = RandomFloats(n, 31);
        if (descr == "<f2")
            global = global.Select(f => (float)(Half)f).ToArray();
        byte[] data = descr == "<f4" ? F4Bytes(global) : F2Bytes(global.Select(f => (Half)f).ToArray());
        string path = WriteFile("tr.npy", NumpyBytes(1, Dict(descr, $"({outer}, {seqLen}, {inner})"), data));

        using var r = NpyReader.Open(path);
        for (int rank = 0; rank < 3; rank++)
        {
            var ranges = Sharding.Ranges(seqLen, 3, rank, ShardLayout.Zigzag);
            Assert.Equal(2, ranges.Count);
            var local = new float[outer * ranges.Sum(x => x.Count) * inner];
            r.ReadTokenRanges(outer, seqLen, inner, ranges, local);
            Assert.Equal(Take(global, outer, seqLen, inner, ranges), local);
        }
    }

    [Fact]
    public void ReadTokenRanges_BadViewOrRangeOrBuffer_Throws()
    {
        string path = WriteFile("v.npy", NumpyBytes(1, Dict("<f4", "(2, 10, 3)"), new byte[240]));
        using var r = NpyReader.Open(path);
        Assert.Throws<ArgumentException>(() => r.ReadTokenRanges(2, 11, 3, [(0, 1)], new float[6]));
        Assert.Throws<ArgumentException>(() => r.ReadTokenRanges(2, 10, 3, [(8, 3)], new float[18]));
        Assert.Throws<ArgumentException>(() => r.ReadTokenRanges(2, 10, 3, [(0, 2)], new float[11]));
    }

    [Fact]
    public void WriteTokenRanges_EachRankWritesItsZigzagShard_FileEqualsGlobal()
    {
        const int outer = 3, seqLen = 19, inner = 4, ranks = 2;
        float[] global = RandomFloats(outer * seqLen * inner, 41);
        string path = PathOf("wtr.npy");
        using (NpyWriter.Create(path, [outer, seqLen, inner]))
        {
        }
        for (int rank = 0; rank < ranks; rank++)
        {
            var ranges = Sharding.Ranges(seqLen, ranks, rank, ShardLayout.Zigzag);
            using var w = NpyWriter.Open(path);
            w.WriteTokenRanges(outer, seqLen, inner, ranges, Take(global, outer, seqLen, inner, ranges));
        }
        Assert.Equal(global, ReadAll(path));
    }

    [Fact]
    public void WriteTokenRanges_OneRank_TouchesOnlyItsRows()
    {
        const int outer = 2, seqLen = 12, inner = 3;
        float[] global = RandomFloats(outer * seqLen * inner, 43);
        (int, int)[] ranges = [(1, 2), (9, 3)];
        string path = PathOf("one.npy");
        using (var w = NpyWriter.Create(path, [outer, seqLen, inner]))
            w.WriteTokenRanges(outer, seqLen, inner, ranges, Take(global, outer, seqLen, inner, ranges));
        float[] all = ReadAll(path);
        for (int o = 0; o < outer; o++)
            for (int t = 0; t < seqLen; t++)
                for (int i = 0; i < inner; i++)
                {
                    int k = (o * seqLen + t) * inner + i;
                    bool mine = t is >= 1 and < 3 or >= 9 and < 12;
                    Assert.Equal(mine ? global[k] : 0f, all[k]);
                }
    }

    // ---- offsets past 2^32 bytes in sparse files ---------------------------------------------------------

    private const long BigN = 600_000_000; // [1, BigN, 8] float32 = 19.2 GB of (sparse) data
    private const int BigInner = 8;

    private static float RowValue(long token, int i) => token % 1000 + i / 8f;

    [Fact]
    public void ReadTokenRanges_SparseFilePast4GiB_ReturnsRowsWrittenAtTheirByteOffsets()
    {
        string path = Path.Combine(Path.GetTempPath(), $"npy-sparse-{Guid.NewGuid():N}.npy");
        try
        {
            byte[] header = NumpyBytes(1, Dict("<f4", $"(1, {BigN}, {BigInner})"), []);
            long[] tokens = [3, BigN - 7, BigN - 6, BigN - 1];
            using (var fs = new FileStream(path, FileMode.CreateNew, FileAccess.Write))
            {
                fs.Write(header);
                fs.SetLength(header.Length + BigN * BigInner * 4);
                foreach (long t in tokens)
                {
                    fs.Position = header.Length + t * BigInner * 4;
                    Assert.True(fs.Position > uint.MaxValue || t == 3);
                    fs.Write(F4Bytes(Enumerable.Range(0, BigInner).Select(i => RowValue(t, i)).ToArray()));
                }
            }

            using var r = NpyReader.Open(path);
            Assert.Equal(BigN * BigInner, r.Header.ElementCount);
            (int Start, int Count)[] ranges = [(3, 1), ((int)(BigN - 7), 2), ((int)(BigN - 2), 2)];
            var local = new float[5 * BigInner];
            r.ReadTokenRanges(1, BigN, BigInner, ranges, local);
            long[] expectTokens = [3, BigN - 7, BigN - 6, BigN - 2, BigN - 1];
            for (int k = 0; k < expectTokens.Length; k++)
                for (int i = 0; i < BigInner; i++)
                {
                    float want = expectTokens[k] == BigN - 2 ? 0f : RowValue(expectTokens[k], i);
                    Assert.Equal(want, local[k * BigInner + i]);
                }
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void WriteTokenRanges_SparseCreatePast4GiB_ReadsBackAtTheRightBytes()
    {
        string path = Path.Combine(Path.GetTempPath(), $"npy-sparse-{Guid.NewGuid():N}.npy");
        try
        {
            (int Start, int Count)[] ranges = [(5, 1), ((int)(BigN - 3), 3)];
            long[] tokens = [5, BigN - 3, BigN - 2, BigN - 1];
            float[] rows = tokens.SelectMany(t => Enumerable.Range(0, BigInner).Select(i => RowValue(t, i))).ToArray();
            long dataOffset;
            using (var w = NpyWriter.Create(path, [1, BigN, BigInner]))
            {
                dataOffset = w.Header.DataOffset;
                Assert.Equal(dataOffset + BigN * BigInner * 4, new FileInfo(path).Length);
                w.WriteTokenRanges(1, BigN, BigInner, ranges, rows);
            }

            // The raw bytes are where a C-order [1, N, 8] float32 array puts them.
            using (var fs = new FileStream(path, FileMode.Open, FileAccess.Read))
            {
                var raw = new byte[BigInner * 4];
                fs.Position = dataOffset + (BigN - 2) * BigInner * 4;
                Assert.True(fs.Position > uint.MaxValue);
                fs.ReadExactly(raw);
                Assert.Equal(F4Bytes(Enumerable.Range(0, BigInner).Select(i => RowValue(BigN - 2, i)).ToArray()), raw);
            }

            using var r = NpyReader.Open(path);
            var local = new float[rows.Length];
            r.ReadTokenRanges(1, BigN, BigInner, ranges, local);
            Assert.Equal(rows, local);
        }
        finally
        {
            File.Delete(path);
        }
    }
}
