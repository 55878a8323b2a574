using System.Runtime.InteropServices;
using ILGPU;
using ILGPU.Runtime;

namespace Distributed.Kernels.Ilgpu;

/// <summary>
/// A tensor held in one ILGPU device buffer (fp32, row-major). It stays on the device between
/// operations; only <see cref="CopyFromHost"/> and <see cref="CopyToHost"/> cross to host memory.
/// </summary>
public sealed unsafe class IlgpuTensor : DeviceTensor
{
    private readonly MemoryBuffer1D<float, Stride1D.Dense> _buffer;

    internal IlgpuTensor(Accelerator accelerator, int[] shape) : base(shape)
    {
        Accelerator = accelerator;
        // ILGPU refuses zero-length buffers; one spare element keeps empty tensors legal.
        _buffer = accelerator.Allocate1D<float>(Math.Max(Length, 1));
        _buffer.View.MemSetToZero();
    }

    /// <summary>The accelerator that owns the buffer.</summary>
    internal Accelerator Accelerator { get; }

    /// <summary>The elements as a device view of exactly <see cref="DeviceTensor.Length"/> floats.</summary>
    internal ArrayView<float> View => _buffer.View.SubView(0, Math.Max(Length, 1));

    /// <inheritdoc/>
    public override void CopyFromHost(ReadOnlySpan<float> source, long offset = 0)
    {
        CheckRange(source.Length, offset, nameof(source));
        if (source.IsEmpty) return;
        // Kernels are queued; a plain host copy does not wait for one still reading or writing this buffer.
        Accelerator.Synchronize();
        // ILGPU takes a raw pointer from the ref: pin the host memory until the copy has completed,
        // or a garbage collection that moves the array makes it copy garbage.
        fixed (float* pinned = source)
        {
            _buffer.View.SubView(offset, source.Length).CopyFromCPU(ref *pinned, source.Length);
            Accelerator.Synchronize();
        }
    }

    /// <inheritdoc/>
    public override void CopyToHost(Span<float> destination, long offset = 0)
    {
        CheckRange(destination.Length, offset, nameof(destination));
        if (destination.IsEmpty) return;
        Accelerator.Synchronize();
        fixed (float* pinned = destination)
        {
            _buffer.View.SubView(offset, destination.Length).CopyToCPU(ref *pinned, destination.Length);
            Accelerator.Synchronize();
        }
    }

    /// <inheritdoc/>
    protected override void Dispose(bool disposing)
    {
        if (disposing) _buffer.Dispose();
        base.Dispose(disposing);
    }

    private void CheckRange(int count, long offset, string name)
    {
        if (offset < 0 || offset + count > Length)
            throw new ArgumentOutOfRangeException(name, $"Copying {count} elements at offset {offset} overruns the tensor {this} of {Length} elements; keep offset + length <= {Length}.");
    }
}
