using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Distributed.Kernels.Cpu;

/// <summary>A tensor of the CPU backend: a pinned fp32 array, so kernels address it by pointer.</summary>
public sealed unsafe class CpuTensor : DeviceTensor
{
    private readonly float[] _data;

    internal CpuTensor(int[] shape) : base(shape)
    {
        if (Length > Array.MaxLength) throw new ArgumentException($"A CPU tensor holds at most {Array.MaxLength} elements; {this} has {Length}.", nameof(shape));
        _data = GC.AllocateArray<float>((int)Length, pinned: true);
        Pointer = (float*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(_data));
    }

    /// <summary>The first element; valid for the tensor's lifetime (the array is pinned).</summary>
    internal float* Pointer { get; }

    /// <summary>The elements.</summary>
    internal Span<float> Span => _data;

    /// <inheritdoc/>
    public override void CopyFromHost(ReadOnlySpan<float> source, long offset = 0)
    {
        CheckRange(offset, source.Length);
        source.CopyTo(_data.AsSpan((int)offset, source.Length));
    }

    /// <inheritdoc/>
    public override void CopyToHost(Span<float> destination, long offset = 0)
    {
        CheckRange(offset, destination.Length);
        _data.AsSpan((int)offset, destination.Length).CopyTo(destination);
    }

    private void CheckRange(long offset, int count)
    {
        if (offset < 0 || offset + count > Length)
            throw new ArgumentOutOfRangeException(nameof(offset), offset, $"Elements [{offset}, {offset + count}) are outside tensor {this} of {Length} elements.");
    }
}
