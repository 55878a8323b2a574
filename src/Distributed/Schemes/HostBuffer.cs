namespace Distributed.Schemes;

/// <summary>Host staging arrays at the communicator boundary: grown when a step needs more, then reused.</summary>
internal static class HostBuffer
{
    /// <summary>Makes <paramref name="buffer"/> hold at least <paramref name="length"/> floats (contents not kept).</summary>
    public static void Grow(ref float[] buffer, long length)
    {
        if (buffer.Length < length) buffer = new float[length];
    }
}
