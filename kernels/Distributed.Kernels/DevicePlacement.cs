namespace Distributed.Kernels;

/// <summary>
/// Which backend and GPU one rank gets. GPU ranks map to <c>localRank % deviceCount</c> unless a device is
/// given, so ranks share GPUs when a host has more ranks than GPUs (with a warning), and <c>auto</c> is
/// decided from the device count alone, the same on every rank: all ranks get a GPU, or none does.
/// </summary>
/// <param name="Backend">The backend name to create: <c>auto</c> is resolved to <c>ilgpu-cuda</c> or <c>cpu</c>.</param>
/// <param name="Device">The CUDA device index (0 for backends without one).</param>
/// <param name="Warning">A line to print (ranks sharing a GPU, or a device index wrapped), or null.</param>
public sealed record DevicePlacement(string Backend, int Device, string? Warning)
{
    /// <summary>Places one rank.</summary>
    /// <param name="backend">One of <see cref="KernelBackends.Names"/>.</param>
    /// <param name="localRank">This rank's index among the ranks of its host (≥ 0).</param>
    /// <param name="localRanks">Ranks on this host (≥ 1); used for the sharing warning.</param>
    /// <param name="device">The <c>--device</c> override, or null.</param>
    /// <param name="cudaDevices">CUDA devices on this host (<see cref="KernelBackends.CudaDeviceCount"/>; tests pass a fake count).</param>
    /// <exception cref="ArgumentException">A negative device or rank, or a device index the host does not have.</exception>
    public static DevicePlacement Choose(string backend, int localRank, int localRanks, int? device, int cudaDevices)
    {
        ArgumentNullException.ThrowIfNull(backend);
        ArgumentOutOfRangeException.ThrowIfNegative(localRank);
        ArgumentOutOfRangeException.ThrowIfNegative(cudaDevices);
        if (device is < 0)
            throw new ArgumentException($"--device must be 0 or more (got {device}).", nameof(device));
        string name = backend.ToLowerInvariant();
        bool cuda = name == "ilgpu-cuda" || (name == "auto" && cudaDevices > 0);
        if (!cuda) return new DevicePlacement(name == "auto" ? "cpu" : name, 0, null);
        if (cudaDevices == 0)
            throw new ArgumentException("--backend ilgpu-cuda needs a CUDA device and this host has none. Use --backend cpu (or auto).", nameof(backend));
        if (device is { } given)
        {
            if (given >= cudaDevices)
                throw new ArgumentException($"--device {given} does not exist: this host has {cudaDevices} CUDA device(s), 0..{cudaDevices - 1}.", nameof(device));
            return new DevicePlacement("ilgpu-cuda", given, null);
        }
        int index = localRank % cudaDevices;
        string? warning = Math.Max(localRanks, localRank + 1) > cudaDevices
            ? $"warning: {Math.Max(localRanks, localRank + 1)} ranks on this host share {cudaDevices} GPU(s); local rank {localRank} uses device {index}."
            : null;
        return new DevicePlacement("ilgpu-cuda", index, warning);
    }
}
