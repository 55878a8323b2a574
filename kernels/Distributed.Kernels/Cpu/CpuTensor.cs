namespace Distributed.Kernels.Cpu;

/// <summary>
/// A tensor of the CPU backend: native fp32 memory (not a managed array), so its element
/// count is limited only by memory, never by 2^31, and kernels address it by pointer. Freed by
/// <see cref="DeviceTensor.Dispose()"/>, or by the finalizer of its buffer if the tensor is forgotten.
/// </summary>
public sealed unsafe partial class CpuTensor : DeviceTensor
{
    private readonly NativeBuffer? _buffer;   // null for a view, which owns nothing

    internal CpuTensor(int[] shape) : base(shape)
    {
        _buffer = new NativeBuffer(Length, zero: true);
        Pointer = _buffer.Pointer;
    }

    /// <summary>A view of <paramref name="shape"/> over memory another tensor owns.</summary>
    internal CpuTensor(int[] shape, float* pointer) : base(shape) => Pointer = pointer;

    /// <summary>A tensor over memory that <paramref name="owner"/> keeps valid (pinned) until this tensor is disposed.</summary>
    internal CpuTensor(int[] shape, float* pointer, IDisposable owner) : base(shape)
    {
        Pointer = pointer;
        _owner = owner;
    }

    private readonly IDisposable? _owner;     // a pin on wrapped host memory, released on dispose

    /// <summary>The first element; valid until the tensor is disposed.</summary>
    internal float* Pointer { get; }

    /// <summary>Native bytes ever allocated by CPU tensors and CPU kernel buffers in this process.</summary>
    public static long TotalAllocatedBytes => NativeBuffer.TotalAllocatedBytes;

    /// <summary>Native bytes held now by CPU tensors and CPU kernel buffers in this process.</summary>
    public static long LiveBytes => NativeBuffer.LiveBytes;

    /// <summary>Elements <c>[offset, offset + count)</c> as a span (<paramref name="count"/> fits an int).</summary>
    internal Span<float> Slice(long offset, int count)
    {
        CheckRange(offset, count);
        return new Span<float>(Pointer + offset, count);
    }

    /// <inheritdoc/>
    public override void CopyFromHost(ReadOnlySpan<float> source, long offset = 0)
    {
        CheckRange(offset, source.Length);
        source.CopyTo(new Span<float>(Pointer + offset, source.Length));
    }

    /// <inheritdoc/>
    public override void CopyToHost(Span<float> destination, long offset = 0)
    {
        CheckRange(offset, destination.Length);
        new ReadOnlySpan<float>(Pointer + offset, destination.Length).CopyTo(destination);
    }

    /// <inheritdoc/>
    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _buffer?.Dispose();
            _owner?.Dispose();
        }
        base.Dispose(disposing);
    }

    private void CheckRange(long offset, int count)
    {
        if (offset < 0 || count < 0 || offset + count > Length)
            throw new ArgumentOutOfRangeException(nameof(offset), offset, $"Elements [{offset}, {offset + count}) are outside tensor {this} of {Length} elements.");
    }
}
