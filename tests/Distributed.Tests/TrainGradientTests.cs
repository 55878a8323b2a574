using Distributed.Cli.Train;
using Distributed.Cluster;
using Distributed.Kernels.Cpu;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>
/// The whole model's gradient (embedding, every layer's gain and Q, K, V, O projections, the final gain and the
/// head), through the distributed path on 2 and 3 in-process ranks, against central finite differences of the loss.
/// </summary>
/// <remarks>
/// The model is fp32; the loss is summed in fp64 from fp32 logits. For each weight tensor, a perturbation
/// δ = ε·rms(w)·r is applied (r: a random normal direction, and separately the sign of the gradient, which makes
/// the change largest), the weights w ± δ are rounded to float, and the change of the loss
/// L(w+δ) − L(w−δ) is compared with Σ g·(w⁺ − w⁻) computed from the same rounded weights, so the rounding of the
/// perturbation is not an error term. With ε = 1e-2 the change is ~1e-3 of the loss, far above the fp32 noise of
/// the loss (~1e-6 relative) and the second-order term of a central difference (ε² ≈ 1e-4 relative); a tolerance
/// of 2% of the change (plus 1e-6 absolute) then leaves room for those, while a wrong factor, sign or term in any
/// backward fails it.
/// </remarks>
public sealed class TrainGradientTests(ITestOutputHelper output)
{
    private static TrainSettings Tiny(int layers) => new()
    {
        SeqLen = 24, Layers = layers, Dim = 16, Heads = 2, Batch = 2, Pairs = 3, Queries = 4, Keys = 6, Values = 6, Seed = 5,
    };

    [Theory]
    [InlineData(2, 2)]
    [InlineData(3, 3)]
    public void Gradient_DistributedModel_MatchesFiniteDifferences(int ranks, int layers)
    {
        var s = Tiny(layers);
        var failures = InProcessCommunicator.Run(ranks, comm =>
        {
            using var backend = new CpuBackend(1);
            using var model = new HybridModel(comm, backend, new HostMath(1), s.Model, s.Seed);
            var batch = new LocalBatch(s.Task, model, s.Batch);
            batch.Draw(s.Seed, RecallTask.TrainSplit, 1, 0);
            double Loss()
            {
                var (sum, answers, _) = TrainRank.SumOverRanks(comm, model.Forward(batch.Tokens, batch.Bound, batch.Targets));
                return sum / answers;
            }
            var (_, total, _) = TrainRank.SumOverRanks(comm, model.Forward(batch.Tokens, batch.Bound, batch.Targets));
            model.Backward(1f / total);
            var p = model.Parameters;
            var g = (float[])p.Gradients.Clone();
            comm.AllReduceSum(g, g);
            var w = p.Values;
            var saved = (float[])w.Clone();
            var problems = new List<string>();
            var rng = new SplitMix64(99);
            foreach (var t in p.Tensors)
                foreach (bool alongGradient in new[] { true, false })
                {
                    double rms = Math.Sqrt(saved.AsSpan(t.Offset, t.Length).ToArray().Average(x => (double)x * x));
                    var delta = new double[t.Length];
                    for (int i = 0; i < t.Length; i++)
                        delta[i] = 1e-3 * rms * (alongGradient ? Math.Sign(g[t.Offset + i]) : rng.NextNormal());
                    var plus = new float[t.Length];
                    var minus = new float[t.Length];
                    for (int i = 0; i < t.Length; i++)
                    {
                        plus[i] = (float)(saved[t.Offset + i] + delta[i]);
                        minus[i] = (float)(saved[t.Offset + i] - delta[i]);
                    }
                    plus.CopyTo(w, t.Offset);
                    double lPlus = Loss();
                    minus.CopyTo(w, t.Offset);
                    double lMinus = Loss();
                    saved.AsSpan(t.Offset, t.Length).CopyTo(w.AsSpan(t.Offset));
                    double fd = lPlus - lMinus, analytic = 0;
                    for (int i = 0; i < t.Length; i++) analytic += g[t.Offset + i] * ((double)plus[i] - minus[i]);
                    string line = $"{t.Name,-12} {(alongGradient ? "sign(g)" : "random"),-8} FD {fd,12:E4} analytic {analytic,12:E4} rel {Math.Abs(fd - analytic) / Math.Abs(analytic):E2}";
                    if (comm.Rank == 0) lock (output) output.WriteLine(line);
                    if (!(Math.Abs(fd - analytic) <= 0.005 * Math.Abs(analytic) + 1e-6)) problems.Add(line);
                }
            return problems;
        });
        Assert.True(failures[0].Count == 0, string.Join("\n", failures[0]));
    }
}
