using System.Text.Json;
using Distributed.Cli.Commands;
using Distributed.Cli.Simulate;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>
/// The simulator's alpha-beta formulas against cases worked by hand, and <c>dsattn simulate</c>'s output.
/// Hardware of the hand cases: 8 GPUs per node; intra α = 5 µs, β = 100 GB/s; inter α = 10 µs, β = 10 GB/s.
/// </summary>
public sealed class SimulatorTests(ITestOutputHelper output)
{
    private static readonly ClusterPreset Hand = new("hand", 8, 5, 100, 10, 10, 1, 1, 4);

    private static void Near(double expected, double actual) => Assert.True(Math.Abs(expected - actual) <= 1e-9 * Math.Max(1, Math.Abs(expected)) + 1e-15, $"expected {expected:E6}, got {actual:E6}");

    [Fact]
    public void AllGather_Ring_IntraAndInterNode()
    {
        // P = 4 on one node, 1 MB per rank: 3 · (5 µs + 1e6 / 1e11 s) = 3 · 15 µs.
        Near(45e-6, new CollectiveCost(Hand, 4).AllGather(1e6));
        // P = 16 over two nodes: paced by the NIC, 15 · (10 µs + 100 µs).
        Near(1.65e-3, new CollectiveCost(Hand, 16).AllGather(1e6));
        Near(1.65e-3, new CollectiveCost(Hand, 16).ReduceScatter(1e6));
        Assert.Equal(0, new CollectiveCost(Hand, 1).AllGather(1e6));
    }

    [Fact]
    public void AllToAll_SplitsTheIntraAndInterNodeShares()
    {
        // P = 4, 4 MB per rank: 3 α + 4e6 · 3/4 / 1e11 = 15 µs + 30 µs.
        Near(45e-6, new CollectiveCost(Hand, 4).AllToAll(4e6));
        // P = 16, 16 MB: 15 · 10 µs + max(16e6 · 7/16 / 1e11, 16e6 · 8/16 / 1e10) = 150 µs + 800 µs.
        Near(950e-6, new CollectiveCost(Hand, 16).AllToAll(16e6));
    }

    [Fact]
    public void SerialChain_CountsTheHopsThatCrossNodes()
    {
        // P = 16: 15 hops, one of them (7 → 8) between nodes: 14 · 15 µs + 110 µs.
        var c = new CollectiveCost(Hand, 16);
        Assert.Equal(1, c.InterNodeHops);
        Near(320e-6, c.SerialChain(1e6));
        // P = 4 on one node: 3 · 15 µs; a ring step is one message.
        Near(45e-6, new CollectiveCost(Hand, 4).SerialChain(1e6));
        Near(15e-6, new CollectiveCost(Hand, 4).RingStep(1e6));
        Near(110e-6, new CollectiveCost(Hand, 16).RingStep(1e6));
        // 64 ranks on 8 nodes: 7 of the 63 hops cross.
        Assert.Equal(7, new CollectiveCost(Hand, 64).InterNodeHops);
    }

    [Fact]
    public void StridedGroup_OneRankPerNode_IsAllInterNode()
    {
        // A hybrid's cross-group ranks at stride 8: each sits on its own node.
        var c = new CollectiveCost(Hand, 4, stride: 8);
        Assert.True(c.SpansNodes);
        Assert.Equal(3, c.InterNodeHops);
        Near(3 * 110e-6, c.AllGather(1e6));
        // Stride 2 over 4 ranks stays on one node (global ranks 0, 2, 4, 6).
        Assert.False(new CollectiveCost(Hand, 4, stride: 2).SpansNodes);
    }

    [Fact]
    public void Lasp2AndLasp1_HandComputedLayer()
    {
        // B=1, N=400, H=2, D=Dv=4, causal, 4 bytes per element, 1 GFLOP/s everywhere, P = 4 on one node.
        var shape = new SimulatedShape(1, 400, 2, 2, 4, 4, 3, true, true);
        var rates = new KernelRates(1e9, 1e9, 1e9, 1e9, "hand");
        var model = new SchemeCostModel(Hand, rates, shape, 4);
        // Per rank n = 100: forward 2·1·2·100·(64·8/2 + 2·16) = 115,200 FLOPs, chunk state 2·2·100·16 = 6,400;
        // forward + backward = (115,200 + 6,400 + 2·115,200 + 6,400) / 1e9 s = 358.4 µs.
        const double compute = 358.4e-6;
        // A state is 2·4·4·4 = 128 B; zigzag: 2 per rank. LASP-2: 2 all-gathers of 256 B = 2 · 3 · (5 µs + 2.56 ns).
        var lasp2 = model.Estimate("lasp2", "lightning");
        Near(2 * 3 * (5e-6 + 256 / 1e11), lasp2.CommMs / 1e3);
        Near(compute + 2 * 3 * (5e-6 + 256 / 1e11), lasp2.TotalMs / 1e3);
        Assert.Equal(2 * 256, lasp2.BytesSent);
        Assert.Equal(2 * 4 * 256, lasp2.BytesReceived);
        // LASP-1: a chain of 3 hops of 128 B each way.
        var lasp1 = model.Estimate("lasp1", "lightning");
        Near(2 * 3 * (5e-6 + 128 / 1e11), lasp1.CommMs / 1e3);
        Near(compute, lasp1.ComputeMs / 1e3);
        Assert.Equal(2 * 128, lasp1.BytesSent);
    }

    [Fact]
    public void Ring_OverlapsEachTransferWithItsStep()
    {
        // Softmax, B=1, N=400, H=Hk=1, D=Dv=4, non-causal, P=4, 1 GFLOP/s: forward 2·400²·8 / 4 = 640,000 FLOPs
        // per rank → 160 µs per step; backward 2.5× → 400 µs per step. K,V block: 100·8·4 = 3,200 B → 5.032 µs.
        var shape = new SimulatedShape(1, 400, 1, 1, 4, 4, 1, false, false);
        var model = new SchemeCostModel(Hand, new KernelRates(1e9, 1e9, 1e9, 1e9, "hand"), shape, 4);
        var ring = model.Estimate("ring", "softmax");
        double tf = 5e-6 + 3200 / 1e11, tb = 5e-6 + 6400 / 1e11;
        Near(4 * 160e-6 + (4 * 400e-6 + tb), ring.TotalMs / 1e3); // compute-bound: every transfer hidden but the last one home
        Near(3 * tf + 4 * tb, ring.CommMs / 1e3);
        Assert.Equal("softmax", ring.Attention);
        // Lightning: the papers' blockwise quadratic baseline, backward 2× instead of 2.5×.
        var quadratic = model.Estimate("ring", "lightning");
        Near(4 * 160e-6 + (4 * 320e-6 + tb), quadratic.TotalMs / 1e3);
    }

    [Fact]
    public void Ulysses_RefusesHeadsNotDivisibleByRanks()
    {
        var shape = SimulatedShape.LinearLlama3_1B(1 << 20);
        var model = new SchemeCostModel(ClusterPreset.A100, KernelRates.FromPreset(ClusterPreset.A100), shape, 64);
        var u = model.Estimate("ulysses", "lightning");
        Assert.False(u.Feasible);
        Assert.Contains("H % P", u.Note, StringComparison.Ordinal);
    }

    [Fact]
    public void SimulateCommand_DefaultsPrintEveryNumberAndWriteJsonArray()
    {
        string dir = Path.Combine(Path.GetTempPath(), $"sim-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        try
        {
            string json = Path.Combine(dir, "sim.json");
            var r = Dsattn.Run($"simulate --ranks 64 --seq 2048K --json {json}", TimeSpan.FromSeconds(60), output);
            Assert.Equal(0, r.ExitCode);
            foreach (var text in new[] { "8 GPUs/node", "α 5 µs", "β 200 GB/s", "α 10 µs", "β 20 GB/s", "150 TFLOP/s", "N=2097152", "H=32", "Hk=8", "16 layers" })
                Assert.Contains(text, r.Stdout, StringComparison.Ordinal);
            using var doc = JsonDocument.Parse(File.ReadAllText(json));
            var names = doc.RootElement.EnumerateArray().Select(e => e.GetProperty("scheme").GetString()).ToList();
            foreach (var s in SchemeCostModel.Schemes) Assert.Contains(s, names);
            foreach (var e in doc.RootElement.EnumerateArray())
                foreach (var key in new[] { "computeMs", "commMs", "totalMs", "bytesSent", "bytesReceived", "attention" })
                    Assert.True(e.TryGetProperty(key, out _), $"{e.GetProperty("scheme")} lacks {key}");
            var bad = Dsattn.Run("simulate --ranks 0 --seq 1024", TimeSpan.FromSeconds(60), output);
            Assert.Equal(2, bad.ExitCode);
            Assert.Contains("--ranks", bad.Stderr, StringComparison.Ordinal);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void KernelRates_FromBenchKernelsJson_PickTheCausalRowsAndNameAMissingOp()
    {
        string file = Path.Combine(Path.GetTempPath(), $"kernels-{Guid.NewGuid():N}.json");
        try
        {
            // The shape `bench kernels --json` writes; causal rows at 10/20/30/40 GFLOP/s, non-causal at 1.
            string Row(string op, bool causal, double g) => $"{{\"op\":\"{op}\",\"causal\":{(causal ? "true" : "false")},\"b\":1,\"h\":8,\"n\":4096,\"d\":64,\"ms\":1,\"gflops\":{g}}}";
            string[] ops = ["flash-forward", "flash-backward", "lightning-forward", "lightning-backward"];
            File.WriteAllText(file, "[" + string.Join(",", ops.SelectMany((op, i) => new[] { Row(op, false, 1), Row(op, true, 10 * (i + 1)) })) + "]");
            var r = MeasuredKernelRates.Load(file, causal: true);
            Assert.Equal(10e9, r.FlashForward, 3);
            Assert.Equal(20e9, r.FlashBackward, 3);
            Assert.Equal(30e9, r.LightningForward, 3);
            Assert.Equal(40e9, r.LightningBackward, 3);
            Assert.Equal(1e9, MeasuredKernelRates.Load(file, causal: false).LightningBackward, 3);
            File.WriteAllText(file, "[" + Row("flash-forward", true, 5) + "]");
            var e = Assert.Throws<ArgumentException>(() => MeasuredKernelRates.Load(file, causal: true));
            Assert.Equal("kernels", e.ParamName);
            Assert.Contains("flash-backward", e.Message, StringComparison.Ordinal);
        }
        finally { File.Delete(file); }
    }

    [Fact]
    public void ParseTokens_TakesKAndMSuffixes()
    {
        Assert.Equal(2097152, SimulateCommand.ParseTokens("2048K"));
        Assert.Equal(1 << 20, SimulateCommand.ParseTokens("1M"));
        Assert.Equal(1000, SimulateCommand.ParseTokens("1000"));
        Assert.Throws<ArgumentException>(() => SimulateCommand.ParseTokens("-4"));
    }
}
