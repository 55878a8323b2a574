using Distributed.Kernels.Cpu;
using Distributed.Kernels.Ilgpu;

namespace Distributed.Kernels;

/// <summary>Picks and creates a kernel backend by name.</summary>
public static class KernelBackends
{
    /// <summary>The names <see cref="Create"/> accepts.</summary>
    public static IReadOnlyList<string> Names { get; } = ["auto", "cpu", "ilgpu", "ilgpu-cuda", "ilgpu-opencl", "ilgpu-cpu"];

    /// <summary>CUDA devices ILGPU sees on this host; 0 without a GPU or driver.</summary>
    public static int CudaDeviceCount() => IlgpuBackend.CudaDeviceCount();

    /// <summary>
    /// Creates a backend. <c>auto</c>: ILGPU on CUDA when a CUDA device is present, else the vectorized CPU
    /// backend (ILGPU's CPU accelerator is a debugging engine, far slower). <c>ilgpu</c>: ILGPU's best
    /// accelerator (CUDA, OpenCL, else its CPU accelerator). <c>cpu</c>: the vectorized CPU backend.
    /// </summary>
    /// <param name="name">One of <see cref="Names"/>.</param>
    /// <param name="deviceIndex">GPU index for CUDA (the caller passes <c>localRank % deviceCount</c> or an override).</param>
    /// <param name="cpuThreads">Worker threads of the CPU backend; 0 means all cores.</param>
    /// <exception cref="ArgumentException">Unknown name, or the named device is not present.</exception>
    public static IKernelBackend Create(string name, int deviceIndex = 0, int cpuThreads = 0)
    {
        ArgumentNullException.ThrowIfNull(name);
        switch (name.ToLowerInvariant())
        {
            case "cpu":
                return new CpuBackend(cpuThreads);
            case "auto":
                return (IKernelBackend?)IlgpuBackend.TryCreateCuda(deviceIndex) ?? new CpuBackend(cpuThreads);
            case "ilgpu":
                return IlgpuBackend.CreateBest();
            case "ilgpu-cuda":
                return IlgpuBackend.TryCreateCuda(deviceIndex)
                    ?? throw new ArgumentException($"No CUDA device {deviceIndex} is present. Use --backend cpu (or auto) on a machine without a GPU.", nameof(name));
            case "ilgpu-opencl":
                return IlgpuBackend.TryCreateOpenCL()
                    ?? throw new ArgumentException("No usable OpenCL device (ILGPU needs the generic address space). Use --backend cpu.", nameof(name));
            case "ilgpu-cpu":
                return IlgpuBackend.CreateCpu();
            default:
                throw new ArgumentException($"Unknown backend '{name}'. Use one of: {string.Join(", ", Names)}.", nameof(name));
        }
    }
}
