using System.Diagnostics;
using System.Text.Json;
using Distributed.Cli.Scaling;
using Distributed.Cluster;
using Distributed.Kernels.Cpu;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>
/// <c>dsattn bench scaling</c> on a tiny sweep (in-process and under mpiexec): valid JSON and CSV with the
/// bytes the schemes must send, non-empty PNGs; and the waiting time, from hand-made events and from a rank
/// that is made late on purpose.
/// </summary>
public sealed class ScalingBenchTests(ITestOutputHelper output)
{
    private static readonly byte[] PngMagic = [0x89, (byte)'P', (byte)'N', (byte)'G'];

    [Fact]
    public void TinySweep_InProcess_WritesJsonCsvAndPngs()
    {
        string dir = Path.Combine(Path.GetTempPath(), $"scaling-{Guid.NewGuid():N}", "nested");
        try
        {
            var r = Dsattn.Run($"bench scaling --out {dir} --ranks 1,2 --schemes lasp2,lasp1,ring --seqs 256,512 --softmax-seqs 128,256 --heads 2 --head-dim 16 --iterations 1 --no-progress",
                TimeSpan.FromSeconds(120), output);
            Assert.Equal(0, r.ExitCode);
            CheckOutputs(dir, expectedCases: 12, kinds: ["lightning", "softmax"]);
        }
        finally { Directory.Delete(Path.GetDirectoryName(dir)!, true); }
    }

    [Fact]
    public void TinySweep_UnderMpiexec_WritesTheSameFiles()
    {
        string dir = Path.Combine(Path.GetTempPath(), $"scaling-mpi-{Guid.NewGuid():N}");
        try
        {
            var r = Dsattn.RunMpi(2, $"bench scaling --out {dir} --attention lightning --schemes lasp2,lasp1 --seqs 256,512 --heads 2 --head-dim 16 --iterations 1 --no-progress",
                TimeSpan.FromSeconds(120), output);
            Assert.Equal(0, r.ExitCode);
            Assert.Contains("MPI, 2 ranks", r.Stdout, StringComparison.Ordinal);
            CheckOutputs(dir, expectedCases: 8, kinds: ["lightning"]);
        }
        finally { if (Directory.Exists(dir)) Directory.Delete(dir, true); }
    }

    private static void CheckOutputs(string dir, int expectedCases, string[] kinds)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, ScalingReport.JsonName)));
        var cases = doc.RootElement.GetProperty("cases").EnumerateArray().ToList();
        Assert.Equal(expectedCases, cases.Count);
        int rows = 0;
        foreach (var c in cases)
        {
            int p = c.GetProperty("ranks").GetInt32();
            var perRank = c.GetProperty("perRank").EnumerateArray().ToList();
            Assert.Equal(p, perRank.Count);
            rows += 2 * p;
            foreach (var r in perRank)
                foreach (var phase in new[] { "forward", "backward" })
                {
                    var f = r.GetProperty(phase);
                    Assert.True(f.GetProperty("wallMs").GetDouble() > 0);
                    Assert.True(f.GetProperty("computeMs").GetDouble() > 0);
                    Assert.True(f.GetProperty("waitMs").GetDouble() >= 0);
                    Assert.True(f.GetProperty("waitMs").GetDouble() <= f.GetProperty("commMs").GetDouble() + 1e-6, "waiting is part of the communication time");
                }
            // LASP-2 at P = 2, causal zigzag: two [1,2,16,16] states per rank and pass: 2·2·2048 bytes sent per step.
            if (c.GetProperty("scheme").GetString() == "lasp2" && p == 2)
                foreach (var r in perRank)
                    Assert.Equal(2 * 2 * 2048.0, r.GetProperty("forward").GetProperty("bytesSent").GetDouble() + r.GetProperty("backward").GetProperty("bytesSent").GetDouble());
            // LASP-1 at P = 2: rank 0 sends its state forward, rank 1 sends dS backward: one 2048-byte state each.
            if (c.GetProperty("scheme").GetString() == "lasp1" && p == 2)
                foreach (var r in perRank)
                    Assert.Equal(2048.0, r.GetProperty("forward").GetProperty("bytesSent").GetDouble() + r.GetProperty("backward").GetProperty("bytesSent").GetDouble());
        }
        // The calibrated model: a preset simulate can load, and a model time beside every case.
        var preset = Distributed.Cli.Simulate.ClusterPreset.Load(Path.Combine(dir, ScalingModel.HardwareName));
        Assert.True(preset.IntraBandwidthGBs > 0 && preset.LightningTflops > 0 && preset.ElementBytes == 4);
        Assert.All(cases, c => Assert.True(c.GetProperty("modelMs").GetDouble() > 0));
        var csv = File.ReadAllLines(Path.Combine(dir, ScalingReport.CsvName));
        Assert.StartsWith("attention,scheme,ranks,n,", csv[0], StringComparison.Ordinal);
        Assert.Equal(rows + 1, csv.Length);
        int columns = csv[0].Split(',').Length;
        Assert.All(csv, line => Assert.Equal(columns, line.Split(',').Length));
        foreach (var kind in kinds)
            foreach (var name in new[] { "time_vs_n", "bytes_vs_n", "weak_efficiency", "time_split" })
            {
                var bytes = File.ReadAllBytes(Path.Combine(dir, $"{name}_{kind}.png"));
                Assert.True(bytes.Length > 1000, $"{name}_{kind}.png has {bytes.Length} bytes");
                Assert.Equal(PngMagic, bytes.Take(4).ToArray());
            }
        Assert.Empty(Directory.GetFiles(dir, ".*")); // no temporary left behind
    }

    [Fact]
    public void WaitTime_HandMadeEvents()
    {
        long ms = Stopwatch.Frequency / 1000;
        // A collective (group 0, #0): rank 0 enters at 0 and blocks until 10 ms; rank 1 enters at 6 ms and leaves at 10.
        // An exchange: rank 1 receives from rank 0, blocking 12..20 ms; rank 0 entered its send at 15 ms.
        var rank0 = new List<CommEvent>
        {
            new(0, 0, -1, -1, 0, 0, 0, 10 * ms),
            new(0, -1, 1, 1, 1, 15 * ms, 15 * ms, 20 * ms),
        };
        var rank1 = new List<CommEvent>
        {
            new(0, 0, -1, -1, 0, 6 * ms, 6 * ms, 10 * ms),
            new(0, -1, 0, 0, 1, 12 * ms, 12 * ms, 20 * ms),
        };
        var w = WaitTime.PerRankAndPhase([rank0, rank1]);
        Assert.Equal(6.0, w[0][0], 6);  // waited 6 ms for rank 1 to enter the collective
        Assert.Equal(0.0, w[1][0], 6);  // the last to arrive waits for nobody
        Assert.Equal(3.0, w[1][1], 6);  // blocked at 12, its peer sent at 15
        Assert.Equal(0.0, w[0][1], 6);  // rank 1 was already there
    }

    [Fact]
    public void WaitTime_LateRankShowsAsTheOthersWait()
    {
        // LASP-1 on 2 ranks: rank 0 starts 600 ms late, so rank 1 blocks for it in the forward hop (the bound leaves
        // room for the two ranks' chunk-state kernels taking different times on a loaded machine).
        var shape = new AttentionShape(1, 64, 2, 2, 8, 8);
        var options = new SequenceParallelOptions { Attention = AttentionKind.Lightning, Scheme = ParallelScheme.Lasp1 };
        var logs = InProcessCommunicator.Run(2, comm =>
        {
            var log = new CommEventLog();
            var timed = new TimedCommunicator(comm, log);
            using var backend = new CpuBackend(1);
            using var attention = new SequenceParallelAttention(timed, backend, shape, options);
            using var q = backend.Allocate(1, 32, 2, 8);
            using var o = backend.Allocate(1, 32, 2, 8);
            comm.Barrier();
            if (comm.Rank == 0) Thread.Sleep(600);
            log.Phase = 0;
            attention.Forward(q, q, q, o);
            return log.Events.ToList();
        }, TimeSpan.FromSeconds(60));
        var w = WaitTime.PerRankAndPhase([logs[0], logs[1]]);
        output.WriteLine($"wait: rank 0 {w[0][0]:F1} ms, rank 1 {w[1][0]:F1} ms");
        Assert.True(w[1][0] >= 350, $"rank 1 waited {w[1][0]:F1} ms for a rank 600 ms late");
        Assert.True(w[0][0] < w[1][0] / 2, $"rank 0 (the late one) waited {w[0][0]:F1} ms");
    }
}
