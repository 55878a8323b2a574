using System.Diagnostics;
using System.Text;
using Distributed.IO;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests.Reliability;

/// <summary>
/// Fuzzes the .npy reader for a bounded time: valid files of every supported version and dtype, then mutated
/// (bit flips, byte runs, truncation, insertion), and headers rewritten from a grammar of plausible and hostile
/// tokens (deep nesting, huge and negative dims, bad dtypes, unterminated strings, non-ASCII). Every open must end in
/// a reader or an <see cref="NpyFormatException"/> (the documented error), within a second, allocating no more than a
/// small multiple of the file's size; an opened reader must read its data. The seed and the failing bytes are
/// printed (as base64) so a failure can be replayed.
/// </summary>
public sealed class NpyReaderFuzzTests(ITestOutputHelper output) : IDisposable
{
    private static readonly TimeSpan Budget = TimeSpan.FromSeconds(double.TryParse(Environment.GetEnvironmentVariable("DSATTN_FUZZ_SECONDS"), out double s) ? s : 4);
    // Memory-backed where there is one: the reader opens a path, and the fuzzer writes thousands of small files.
    private readonly string _dir = Directory.Exists("/dev/shm")
        ? Directory.CreateDirectory(Path.Combine("/dev/shm", $"dsattn-fuzz-{Guid.NewGuid():N}")).FullName
        : Directory.CreateTempSubdirectory("dsattn-fuzz-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Fact]
    public void Open_RandomAndMutatedFiles_OnlyDocumentedErrors_NoHangNoUnboundedAllocation()
    {
        int seed = Environment.TickCount;
        var rng = new Random(seed);
        string path = Path.Combine(_dir, "f.npy");
        long executions = 0, opened = 0, refused = 0;
        var problems = new Dictionary<NpyProblem, long>();
        double slowestMs = 0;
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < Budget)
        {
            byte[] bytes = rng.Next(5) switch
            {
                0 => Valid(rng),
                1 => Mutate(Valid(rng), rng),
                2 or 3 => FromHeader(GrammarHeader(rng), rng),
                _ => RandomBytes(rng),
            };
            File.WriteAllBytes(path, bytes);
            long allocatedBefore = GC.GetAllocatedBytesForCurrentThread();
            var one = Stopwatch.StartNew();
            try
            {
                using var reader = NpyReader.Open(path);
                // A reader that opened must read every element it claims (up to 4096 of them).
                var data = new float[Math.Min(reader.Header.ElementCount, 4096)];
                reader.Read(0, data);
                if (reader.Header.ElementCount > data.Length) reader.Read(reader.Header.ElementCount - 1, new float[1]);
                opened++;
            }
            catch (NpyFormatException e)
            {
                refused++;
                problems[e.Problem] = problems.GetValueOrDefault(e.Problem) + 1;
                Assert.False(string.IsNullOrWhiteSpace(e.Message));
                Assert.Contains(path, e.Message, StringComparison.Ordinal);
            }
            catch (Exception e)
            {
                Assert.Fail($"seed {seed}, execution {executions}: {e.GetType().Name}: {e.Message}\nfile (base64): {Convert.ToBase64String(bytes)}");
            }
            double ms = one.Elapsed.TotalMilliseconds;
            slowestMs = Math.Max(slowestMs, ms);
            long allocated = GC.GetAllocatedBytesForCurrentThread() - allocatedBefore;
            Assert.True(ms < 1000, $"seed {seed}: one open took {ms:F0} ms\nfile (base64): {Convert.ToBase64String(bytes)}");
            Assert.True(allocated <= 64L * bytes.Length + (1 << 20), $"seed {seed}: one open of a {bytes.Length}-byte file allocated {allocated} bytes\nfile (base64): {Convert.ToBase64String(bytes)}");
            executions++;
        }
        output.WriteLine($"seed {seed}: {executions} executions in {clock.Elapsed.TotalSeconds:F1} s ({opened} opened, {refused} refused: {string.Join(", ", problems.Select(p => $"{p.Key} {p.Value}"))}); slowest {slowestMs:F1} ms");
        Assert.True(executions > 100, $"only {executions} executions");
        Assert.True(opened > 0 && refused > 0, "the fuzzer must reach both outcomes");
    }

    [Theory]
    [InlineData(100_000)]
    [InlineData(4_000_000)]
    public void Open_DeeplyNestedHeader_IsRefusedNotAStackOverflow(int depth)
    {
        string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': " + new string('(', depth) + new string(')', depth) + ", }";
        string path = Path.Combine(_dir, "deep.npy");
        File.WriteAllBytes(path, Frame(2, Encoding.ASCII.GetBytes(dict), []));
        var e = Assert.Throws<NpyFormatException>(() => NpyReader.Open(path).Dispose());
        output.WriteLine(e.Message[..Math.Min(300, e.Message.Length)]);
        Assert.Equal(NpyProblem.MalformedHeader, e.Problem);
        Assert.Contains("nest", e.Message, StringComparison.Ordinal);
    }

    /// <summary>A valid file: version 1, 2 or 3, float32 or float16, rank 0 to 4, small dims.</summary>
    private static byte[] Valid(Random rng)
    {
        int rank = rng.Next(5);
        var shape = Enumerable.Range(0, rank).Select(_ => rng.Next(4)).ToArray();
        bool half = rng.Next(2) == 0;
        long count = shape.Aggregate(1L, (a, b) => a * b);
        string dims = rank == 1 ? $"({shape[0]},)" : "(" + string.Join(", ", shape) + ")";
        string dict = $"{{'descr': '{(half ? "<f2" : "<f4")}', 'fortran_order': False, 'shape': {dims}, }}";
        var data = new byte[count * (half ? 2 : 4)];
        rng.NextBytes(data);
        return Frame(rng.Next(1, 4), Encoding.ASCII.GetBytes(dict), data);
    }

    /// <summary>Magic, version, header length (padded to 64 with spaces and a newline), header, data.</summary>
    private static byte[] Frame(int major, byte[] dict, byte[] data)
    {
        int lengthSize = major == 1 ? 2 : 4;
        int unpadded = 8 + lengthSize + dict.Length + 1;
        int pad = (64 - unpadded % 64) % 64;
        int headerLength = dict.Length + pad + 1;
        if (major == 1 && headerLength > ushort.MaxValue) major = 2;
        lengthSize = major == 1 ? 2 : 4;
        var b = new List<byte>(8 + lengthSize + headerLength + data.Length) { 0x93, (byte)'N', (byte)'U', (byte)'M', (byte)'P', (byte)'Y', (byte)major, 0 };
        if (lengthSize == 2) b.AddRange(BitConverter.GetBytes((ushort)headerLength));
        else b.AddRange(BitConverter.GetBytes(headerLength));
        b.AddRange(dict);
        b.AddRange(Enumerable.Repeat((byte)' ', pad));
        b.Add((byte)'\n');
        b.AddRange(data);
        return [.. b];
    }

    private static byte[] Mutate(byte[] b, Random rng)
    {
        var list = b.ToList();
        int edits = rng.Next(1, 6);
        for (int e = 0; e < edits && list.Count > 0; e++)
        {
            int at = rng.Next(list.Count);
            switch (rng.Next(6))
            {
                case 0: list[at] ^= (byte)(1 << rng.Next(8)); break;
                case 1: list[at] = (byte)rng.Next(256); break;
                case 2: list.RemoveRange(at, Math.Min(list.Count - at, rng.Next(1, 16))); break;
                case 3: list.InsertRange(at, Enumerable.Range(0, rng.Next(1, 16)).Select(_ => (byte)rng.Next(256))); break;
                case 4: list.RemoveRange(at, list.Count - at); break; // truncate
                default: list[at] = (byte)Syntax[rng.Next(Syntax.Length)]; break;
            }
        }
        return [.. list];
    }

    private const string Syntax = "(){}[],:'\"0123456789-LTFN \n";

    private static readonly string[] Tokens =
    [
        "{", "}", "(", ")", "[", "]", ",", ":", " ", "'descr'", "'fortran_order'", "'shape'", "'<f4'", "'<f2'", "'<f8'", "'>f4'", "'|u1'",
        "True", "False", "None", "0", "1", "3", "-1", "7L", "18446744073709551616", "9223372036854775807", "4294967296", "'", "\"", "\\",
        "'extra'", "é", "\u0000", "((((", "))))",
    ];

    /// <summary>A header from a grammar: usually well formed with hostile values, sometimes token soup.</summary>
    private static byte[] GrammarHeader(Random rng)
    {
        string Pick(params string[] options) => options[rng.Next(options.Length)];
        if (rng.Next(4) == 0)
            return Encoding.UTF8.GetBytes(string.Concat(Enumerable.Range(0, rng.Next(1, 40)).Select(_ => Tokens[rng.Next(Tokens.Length)])));
        string dim() => Pick("0", "1", "2", "3", "-1", "65536", "2147483648", "9223372036854775807", "3L", "(2,)", "'2'", "None");
        int rank = rng.Next(6);
        string shape = Pick("(", "[") + string.Join(", ", Enumerable.Range(0, rank).Select(_ => dim())) + (rank == 1 && rng.Next(2) == 0 ? "," : "") + Pick(")", "]", ")", "");
        var entries = new List<string>
        {
            $"'descr': {Pick("'<f4'", "'<f2'", "'<f8'", "'>f4'", "'f4'", "'<i4'", "[('a', '<f4')]", "4")}",
            $"'fortran_order': {Pick("False", "True", "0", "'False'")}",
            $"'shape': {shape}",
        };
        if (rng.Next(8) == 0) entries.Add("'extra': 1");
        if (rng.Next(8) == 0) entries.RemoveAt(rng.Next(entries.Count));
        if (rng.Next(8) == 0) entries.Add(entries[0]);
        entries = [.. entries.OrderBy(_ => rng.Next())];
        return Encoding.UTF8.GetBytes("{" + string.Join(", ", entries) + Pick(", }", "}", "", ",}"));
    }

    private static byte[] FromHeader(byte[] dict, Random rng)
    {
        var data = new byte[rng.Next(0, 64)];
        rng.NextBytes(data);
        return Frame(rng.Next(1, 4), dict, data);
    }

    private static byte[] RandomBytes(Random rng)
    {
        var b = new byte[rng.Next(0, 200)];
        rng.NextBytes(b);
        if (b.Length >= 8 && rng.Next(2) == 0)
        {
            byte[] magic = [0x93, (byte)'N', (byte)'U', (byte)'M', (byte)'P', (byte)'Y', (byte)rng.Next(0, 5), (byte)rng.Next(0, 2)];
            magic.CopyTo(b, 0);
        }
        return b;
    }
}
