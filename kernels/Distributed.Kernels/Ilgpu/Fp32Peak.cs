using ILGPU.Runtime.Cuda;

namespace Distributed.Kernels.Ilgpu;

/// <summary>
/// The fp32 peak of a CUDA device on its CUDA cores (no tensor cores): SMs x fp32 lanes per SM x 2 flops
/// per fused multiply-add x clock. The lanes per SM follow the compute capability (CUDA C Programming Guide,
/// "Arithmetic Instructions"): 64 on 8.0 (A100), 128 on 8.6, 8.9 and 9.0 (H100).
/// </summary>
public static class Fp32Peak
{
    /// <summary>fp32 lanes per SM for compute capability <paramref name="major"/>.<paramref name="minor"/>, or null when unknown.</summary>
    public static int? LanesPerSm(int major, int minor) => (major, minor) switch
    {
        (7, _) => 64,
        (8, 0) => 64,
        (8, _) => 128,
        (9, 0) => 128,
        (10, _) or (12, _) => 128,
        _ => null,
    };

    /// <summary>Peak fp32 TFLOP/s of <paramref name="multiprocessors"/> SMs at <paramref name="clockKHz"/>, or null for an unknown capability.</summary>
    /// <exception cref="ArgumentOutOfRangeException">A count or clock that is not positive.</exception>
    public static double? Tflops(int major, int minor, int multiprocessors, int clockKHz)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(multiprocessors, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(clockKHz, 1);
        return LanesPerSm(major, minor) is { } lanes ? multiprocessors * (double)lanes * 2 * clockKHz * 1e3 / 1e12 : null;
    }

    /// <summary>The peak of the CUDA device behind <paramref name="backend"/>, or null when it is not a CUDA device or unknown.</summary>
    public static double? Of(IKernelBackend backend) =>
        backend is IlgpuBackend { Accelerator: CudaAccelerator cuda }
            ? Tflops(cuda.Architecture is { } a ? a.Major : 0, cuda.Architecture is { } b ? b.Minor : 0, cuda.NumMultiprocessors, cuda.ClockRate)
            : null;
}
