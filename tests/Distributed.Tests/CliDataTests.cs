using Distributed.IO;
using Distributed.Reference;
using Xunit;
using Xunit.Abstractions;
using Dims = Distributed.Reference.ReferenceAttention.Dims;

namespace Distributed.Tests;

/// <summary>
/// <c>dsattn run</c> on real files, as a user runs it: .npy inputs written by the test, the real program
/// (in-process ranks and a real <c>mpiexec -n 4</c>), and outputs read back and compared with an fp64
/// reference the test computes itself. Also: atomic outputs after a failure, and bad files.
/// </summary>
public sealed class CliDataTests(ITestOutputHelper output) : IDisposable
{
    // N = 100 is not a multiple of any tile; B = 2; GQA 4/2; D ≠ Dv.
    private const int B = 2, N = 100, H = 4, Hk = 2, D = 16, Dv = 8;
    private readonly string _dir = Directory.CreateTempSubdirectory("dsattn-data-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private string P(string name) => Path.Combine(_dir, name);

    private sealed record Inputs(double[] Q, double[] K, double[] V, double[] DO);

    private Inputs WriteInputs(double kvAmplitude)
    {
        var x = new Inputs(ReferenceAttention.Random((long)B * N * H * D, 21), ReferenceAttention.Random((long)B * N * Hk * D, 22, kvAmplitude),
            ReferenceAttention.Random((long)B * N * Hk * Dv, 23), ReferenceAttention.Random((long)B * N * H * Dv, 24));
        Write(P("q.npy"), x.Q, B, N, H, D);
        Write(P("k.npy"), x.K, B, N, Hk, D);
        Write(P("v.npy"), x.V, B, N, Hk, Dv);
        Write(P("do.npy"), x.DO, B, N, H, Dv);
        return x;
    }

    private static void Write(string path, double[] data, params long[] shape)
    {
        using var w = NpyWriter.Create(path, shape);
        w.Write(0, data.Select(d => (float)d).ToArray());
    }

    private static float[] Read(string path, params long[] shape)
    {
        using var r = NpyReader.Open(path);
        Assert.Equal(shape, r.Header.Shape);
        var a = new float[r.Header.ElementCount];
        r.Read(0, a);
        return a;
    }

    private string Files => $"--q {P("q.npy")} --k {P("k.npy")} --v {P("v.npy")} --dout {P("do.npy")} --out {P("o.npy")} --grads {P("g")} --backward --backend cpu --no-progress";

    public static TheoryData<string, bool> Jobs() => new()
    {
        { "--attention softmax --scheme allgather", false },
        { "--attention softmax --scheme ring --no-causal", false },
        { "--attention lightning --scheme lasp2 --decay 0.9", false },
        { "--attention softmax --scheme allgather", true },
        { "--attention lightning --scheme lasp2 --decay 0.9", true },
    };

    [Theory]
    [MemberData(nameof(Jobs))]
    public void Run_NpyInputs_WritesOutputsThatMatchTheFp64Reference(string job, bool underMpi)
    {
        bool lightning = job.Contains("lightning", StringComparison.Ordinal);
        bool causal = !job.Contains("--no-causal", StringComparison.Ordinal);
        var x = WriteInputs(lightning ? 0.25 : 1.0);
        string args = $"run {job} {Files}{(lightning ? "" : $" --lse {P("lse.npy")}")} --check";
        var r = underMpi ? Dsattn.RunMpi(4, args, TimeSpan.FromSeconds(180), output) : Dsattn.Run($"{args} --ranks 4", TimeSpan.FromSeconds(120), output);
        Assert.True(r.ExitCode == 0, r.Stdout + r.Stderr);

        var dims = new Dims(B, N, N, H, Hk, D, Dv);
        double[] o, dq, dk, dv, lse = [];
        if (lightning)
        {
            var decay = Enumerable.Repeat(0.9, H).ToArray();
            o = ReferenceAttention.LightningForward(x.Q, x.K, x.V, decay, causal, null, dims).O;
            (dq, dk, dv, _) = ReferenceAttention.LightningBackward(x.Q, x.K, x.V, decay, causal, null, x.DO, null, dims);
        }
        else
        {
            (o, lse) = ReferenceAttention.FlashForward(x.Q, x.K, x.V, dims, 0, 0, causal, 1 / Math.Sqrt(D));
            (dq, dk, dv) = ReferenceAttention.FlashBackward(x.Q, x.K, x.V, x.DO, dims, 0, 0, causal, 1 / Math.Sqrt(D));
        }
        Assert.True(ReferenceAttention.RelativeError(Read(P("o.npy"), B, N, H, Dv), o) < 1e-4, "O");
        Assert.True(ReferenceAttention.RelativeError(Read(P("g.dq.npy"), B, N, H, D), dq) < 1e-4, "dQ");
        Assert.True(ReferenceAttention.RelativeError(Read(P("g.dk.npy"), B, N, Hk, D), dk) < 1e-4, "dK");
        Assert.True(ReferenceAttention.RelativeError(Read(P("g.dv.npy"), B, N, Hk, Dv), dv) < 1e-4, "dV");
        if (!lightning) Assert.True(ReferenceAttention.RelativeError(Read(P("lse.npy"), B, H, N), lse) < 1e-5, "LSE");
        foreach (string t in new[] { "O", "dQ", "dK", "dV" }) Assert.Contains($"check {t}:", r.Stdout, StringComparison.Ordinal);
        Assert.Empty(Directory.GetFiles(_dir, ".*.tmp"));
        Assert.DoesNotContain("leaked", r.Stderr, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Run_RankFailsAfterWritingPart_LeavesNoOutputAndKeepsTheOldFile(bool underMpi)
    {
        WriteInputs(1.0);
        byte[] old = [1, 2, 3, 4, 5];
        File.WriteAllBytes(P("o.npy"), old);
        string args = $"run --attention softmax --scheme allgather {Files} --fail-rank 2 --fail-at write";
        var r = underMpi ? Dsattn.RunMpi(4, args, TimeSpan.FromSeconds(120), output) : Dsattn.Run($"{args} --ranks 4", TimeSpan.FromSeconds(120), output);
        Assert.NotEqual(0, r.ExitCode);
        Assert.Contains("rank 2", r.Stdout + r.Stderr, StringComparison.Ordinal);
        Assert.Equal(old, File.ReadAllBytes(P("o.npy")));
        Assert.False(File.Exists(P("g.dq.npy")));
        Assert.Empty(Directory.GetFiles(_dir, ".*.tmp"));
        Assert.Equal(5, Directory.GetFiles(_dir).Length); // the four inputs and the old o.npy
    }

    [Fact]
    public void Run_StaleTemporaryOfAKilledJob_IsRemovedByTheNextRun()
    {
        WriteInputs(1.0);
        string stale = P(".o.npy.dsattn-deadbeef.tmp");
        File.WriteAllBytes(stale, [9, 9, 9]);
        var r = Dsattn.Run($"run --ranks 2 --attention softmax --scheme allgather {Files}", TimeSpan.FromSeconds(120), output);
        Assert.True(r.ExitCode == 0, r.Stdout + r.Stderr);
        Assert.False(File.Exists(stale));
        Assert.True(File.Exists(P("o.npy")));
    }

    public static TheoryData<string, string, string> BadFiles() => new()
    {
        { "magic", "q.npy", "magic" },
        { "fortran", "k.npy", "Fortran" },
        { "truncated", "v.npy", "truncated" },
        { "f8", "q.npy", "<f8" },
        { "rank3", "q.npy", "4-D" },
        { "mismatch", "k.npy", "q.npy" },
        { "missing", "v.npy", "v.npy" },
    };

    [Theory]
    [MemberData(nameof(BadFiles))]
    public void Run_BadInputFile_ExitsTwoNamingTheFileAndWritesNothing(string kind, string file, string expected)
    {
        WriteInputs(1.0);
        string path = P(file);
        switch (kind)
        {
            case "magic": File.WriteAllBytes(path, [.. "NOTNPY\x01\x00"u8, .. new byte[64]]); break;
            case "fortran": File.WriteAllBytes(path, Header("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 100, 2, 16), }", B * N * Hk * D * 4)); break;
            case "truncated": File.WriteAllBytes(path, File.ReadAllBytes(path)[..^40]); break;
            case "f8": File.WriteAllBytes(path, Header("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 100, 4, 16), }", B * N * H * D * 8)); break;
            case "rank3": Write(path, new double[B * N * H * D], B, N, H * D); break;
            case "mismatch": Write(path, new double[B * (N - 1) * Hk * D], B, N - 1, Hk, D); break;
            case "missing": File.Delete(path); break;
        }
        var r = Dsattn.Run($"run --ranks 2 --attention softmax --scheme allgather {Files}", TimeSpan.FromSeconds(60), output);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains(file, r.Stderr, StringComparison.Ordinal);
        Assert.Contains(expected, r.Stderr, StringComparison.OrdinalIgnoreCase);
        Assert.DoesNotContain("   at ", r.Stderr, StringComparison.Ordinal);
        Assert.False(File.Exists(P("o.npy")));
        Assert.Empty(Directory.GetFiles(_dir, ".*.tmp"));
    }

    /// <summary>A NumPy 1.0 file with this header text and <paramref name="dataBytes"/> zero bytes of data.</summary>
    private static byte[] Header(string dict, int dataBytes)
    {
        int unpadded = 10 + dict.Length + 1;
        string text = dict + new string(' ', (64 - unpadded % 64) % 64) + "\n";
        var bytes = new List<byte> { 0x93, (byte)'N', (byte)'U', (byte)'M', (byte)'P', (byte)'Y', 1, 0, (byte)(text.Length & 0xFF), (byte)(text.Length >> 8) };
        bytes.AddRange(System.Text.Encoding.ASCII.GetBytes(text));
        bytes.AddRange(new byte[dataBytes]);
        return [.. bytes];
    }

    [Fact]
    public void Run_OutputFolderMissing_ExitsTwoNamingTheOption()
    {
        WriteInputs(1.0);
        var r = Dsattn.Run($"run --ranks 2 --attention softmax --scheme allgather {Files.Replace(P("o.npy"), P("nope/o.npy"), StringComparison.Ordinal)}", TimeSpan.FromSeconds(60), output);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains("--out", r.Stderr, StringComparison.Ordinal);
        Assert.Empty(Directory.GetFiles(_dir, ".*.tmp"));
    }

    [Theory]
    [InlineData("--seq 2147483647 --heads 64", "per rank")]
    [InlineData("--seq 100 --heads 4 --kv-heads 2 --head-dim 16 --lse x.npy --attention lightning", "--lse")]
    [InlineData("--seq 100 --grads g", "--grads")]
    [InlineData("--seq 100 --out o.npy", "--attention")]
    [InlineData("--seq 100 --attention softmax --out /proc/o.npy", "--out /proc/o.npy: cannot create files")]
    public void Run_ImpossibleRequest_ExitsTwoWithTheReason(string args, string named)
    {
        var r = Dsattn.Run($"run --ranks 4 {args} --backend cpu", TimeSpan.FromSeconds(60), output);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains(named, r.Stderr, StringComparison.Ordinal);
        Assert.DoesNotContain("Exception", r.Stderr, StringComparison.Ordinal);
    }
}
