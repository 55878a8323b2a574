using Distributed.Kernels;
using Distributed.Reference;
using Xunit;
using Xunit.Abstractions;
using Dims = Distributed.Reference.ReferenceAttention.Dims;

namespace Distributed.Tests.Reliability;

/// <summary>
/// Every scheme on ILGPU's CPU accelerator (the ILGPU kernels a GPU runs, executed on the host), P = 2 in-process
/// ranks, small shapes, forward and backward against the fp64 reference. The two ranks' backends are made once and
/// kept for every scheme, so ILGPU compiles its kernels once per rank rather than once per run.
/// </summary>
public sealed class IlgpuSchemeTests(ITestOutputHelper output)
{
    private static readonly AttentionShape Shape = new(1, 72, 4, 2, 16, 8);

    [Fact]
    public void EveryScheme_IlgpuCpuAccelerator_MatchesFp64()
    {
        var backends = new[] { KernelBackends.Create("ilgpu-cpu"), KernelBackends.Create("ilgpu-cpu") };
        try
        {
            var dims = new Dims(1, Shape.SeqLen, Shape.SeqLen, Shape.Heads, Shape.KvHeads, Shape.HeadDim, Shape.ValueDim);
            foreach (var c in SchemeRun.AllSchemes(Shape))
            {
                bool lightning = c.Options.Attention == AttentionKind.Lightning;
                var x = lightning ? GlobalInputs.Random(Shape, 81, 1f, 0.25f) : GlobalInputs.Random(Shape, 81);
                double[] W(float[] a) => [.. a.Select(f => (double)f)];
                var (q, k, v, dO) = (W(x.Q), W(x.K), W(x.V), W(x.DO));
                double[] o, dq, dk, dv;
                if (lightning)
                {
                    var decay = c.Options.Decay!.Select(f => (double)f).ToArray();
                    o = ReferenceAttention.LightningForward(q, k, v, decay, true, null, dims).O;
                    (dq, dk, dv, _) = ReferenceAttention.LightningBackward(q, k, v, decay, true, null, dO, null, dims);
                }
                else
                {
                    double scale = 1 / Math.Sqrt(Shape.HeadDim);
                    o = ReferenceAttention.FlashForward(q, k, v, dims, 0, 0, true, scale).O;
                    (dq, dk, dv) = ReferenceAttention.FlashBackward(q, k, v, dO, dims, 0, 0, true, scale);
                }
                var got = SchemeRun.Run(c, x, backends);
                double e = new[] { ReferenceAttention.RelativeError(got.O, o), ReferenceAttention.RelativeError(got.DQ, dq), ReferenceAttention.RelativeError(got.DK, dk), ReferenceAttention.RelativeError(got.DV, dv) }.Max();
                output.WriteLine($"{backends[0].Name} {c.Name}: P = 2, relative error {e:E2}");
                Assert.True(e <= 1e-4, $"{c.Name}: {e:E2}");
            }
        }
        finally
        {
            foreach (var b in backends) b.Dispose();
        }
    }
}
