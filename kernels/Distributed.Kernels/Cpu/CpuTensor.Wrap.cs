using System.Buffers;

namespace Distributed.Kernels.Cpu;

public sealed unsafe partial class CpuTensor
{
    /// <summary>
    /// A CPU tensor over existing host memory, without a copy: <paramref name="memory"/> is pinned until the
    /// tensor is disposed, and the kernels read and write it in place. Its length must equal the product of
    /// <paramref name="shape"/> (e.g. <c>[B, Nloc, H, D]</c> for a local q). Disposing the tensor unpins the
    /// memory and frees nothing else; the memory must not be returned to a pool before that.
    /// </summary>
    /// <param name="memory">Row-major fp32 elements.</param>
    /// <param name="shape">The tensor's dimensions, outermost first.</param>
    /// <exception cref="ArgumentException">The length does not match the shape.</exception>
    public static CpuTensor Wrap(Memory<float> memory, params int[] shape)
    {
        ArgumentNullException.ThrowIfNull(shape);
        long n = 1;
        foreach (int d in shape)
        {
            if (d < 0) throw new ArgumentOutOfRangeException(nameof(shape), $"Tensor dimensions must be non-negative; got [{string.Join(",", shape)}].");
            n *= d;
        }
        if (n != memory.Length)
            throw new ArgumentException($"The memory holds {memory.Length} floats but shape [{string.Join(",", shape)}] needs {n}; pass a slice of exactly that length.", nameof(memory));
        var pin = memory.Pin();
        return new CpuTensor(shape, (float*)pin.Pointer, new PinRelease(pin));
    }

    /// <summary>A CPU tensor over <paramref name="array"/> (see <see cref="Wrap(Memory{float}, int[])"/>).</summary>
    public static CpuTensor Wrap(float[] array, params int[] shape)
    {
        ArgumentNullException.ThrowIfNull(array);
        return Wrap(array.AsMemory(), shape);
    }

    private sealed class PinRelease(MemoryHandle handle) : IDisposable
    {
        private MemoryHandle _handle = handle;

        public void Dispose() => _handle.Dispose();
    }
}
