using Distributed.Cli.Run;
using Distributed.Kernels;
using Distributed.Kernels.Cpu;
using Xunit;

namespace Distributed.Tests;

/// <summary>
/// The point of <c>--check</c> (sampled): it compares with a reference that shares no code with the kernels,
/// so a wrong kernel is caught, where <c>--check full</c> (the same kernels over the whole sequence) is
/// fooled. The planted bug: a backend whose softmax forward adds 0.05 to one global query row of O.
/// </summary>
public sealed class SampledCheckTests
{
    /// <summary>Delegates to the CPU backend; FlashForward then perturbs global query row <paramref name="row"/> (batch 0, all heads).</summary>
    private sealed class PerturbingBackend(IKernelBackend inner, long row) : IKernelBackend
    {
        public string Name => "cpu-perturbed";
        public DeviceTensor Allocate(params int[] shape) => inner.Allocate(shape);
        public void Clear(DeviceTensor tensor) => inner.Clear(tensor);
        public void CopySlice(DeviceTensor source, int srcStart, DeviceTensor destination, int dstStart, int count, int axis) => inner.CopySlice(source, srcStart, destination, dstStart, count, axis);
        public void SoftmaxRowDot(DeviceTensor o, DeviceTensor dO, DeviceTensor drow) => inner.SoftmaxRowDot(o, dO, drow);
        public void FlashBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor lse, DeviceTensor drow, DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV, in FlashOptions options) =>
            inner.FlashBackward(q, k, v, lse, drow, dO, dQ, dK, dV, options);
        public void MergeSoftmax(DeviceTensor oA, DeviceTensor lseA, DeviceTensor oB, DeviceTensor lseB) => inner.MergeSoftmax(oA, lseA, oB, lseB);
        public void LightningForward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal, DeviceTensor? s0, DeviceTensor o, DeviceTensor? sEnd) =>
            inner.LightningForward(q, k, v, decay, causal, s0, o, sEnd);
        public void LightningBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal, DeviceTensor? s0, DeviceTensor dO, DeviceTensor? dSEnd, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV, DeviceTensor? dS0) =>
            inner.LightningBackward(q, k, v, decay, causal, s0, dO, dSEnd, dQ, dK, dV, dS0);
        public void LightningChunkState(DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal, DeviceTensor m) => inner.LightningChunkState(k, v, decay, causal, m);
        public void LightningChunkStateBackward(DeviceTensor q, DeviceTensor dO, ReadOnlySpan<float> decay, bool causal, DeviceTensor dM) => inner.LightningChunkStateBackward(q, dO, decay, causal, dM);
        public void LightningInterChunkForward(DeviceTensor q, ReadOnlySpan<float> decay, bool causal, DeviceTensor s0, DeviceTensor o) => inner.LightningInterChunkForward(q, decay, causal, s0, o);
        public void LightningInterChunkBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal, DeviceTensor? s0, DeviceTensor dO, DeviceTensor? dSEnd, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV) =>
            inner.LightningInterChunkBackward(q, k, v, decay, causal, s0, dO, dSEnd, dQ, dK, dV);
        public void Synchronize() => inner.Synchronize();
        public void Dispose() => inner.Dispose();

        public void FlashForward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o, DeviceTensor lse, in FlashOptions options)
        {
            inner.FlashForward(q, k, v, o, lse, options);
            long local = row - options.QueryOffset;
            if (local < 0 || local >= o.Shape[1]) return;
            int width = o.Shape[2] * o.Shape[3];
            var values = new float[width];
            o.CopyToHost(values, local * width);
            for (int i = 0; i < width; i++) values[i] += 0.05f;
            o.CopyFromHost(values, local * width);
        }
    }

    private static int Run(CheckMode check, long perturbedRow) =>
        RunExecution.Execute(
            new RunSettings
            {
                Jobs = [new JobSpec(AttentionKind.Softmax, ParallelScheme.AllGather, true, "none")],
                Ranks = 4, Backward = true, Check = check, Progress = false, Backend = "cpu",
            },
            new ShapeOptions(1, 96, 4, 2, 16, 16), representative: false,
            (_, _, _) => perturbedRow < 0 ? new CpuBackend(1) : new PerturbingBackend(new CpuBackend(1), perturbedRow));

    [Fact]
    public void SampledCheck_PerturbedKernel_FailsWhereTheFullCheckPasses()
    {
        // Zigzag over 4 ranks cuts N = 96 into 8 chunks of 12: row 12 is the first row of rank 1's first chunk.
        Assert.Equal(0, Run(CheckMode.Sampled, -1));
        Assert.Equal(1, Run(CheckMode.Sampled, 12));
        Assert.Equal(0, Run(CheckMode.Full, 12));
    }
}
