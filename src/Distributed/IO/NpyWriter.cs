using System.Buffers.Binary;
using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;
using Microsoft.Win32.SafeHandles;

namespace Distributed.IO;

/// <summary>
/// Writes a little-endian float32 (<c>&lt;f4</c>), C-order .npy file with positional writes
/// (<see cref="RandomAccess"/>), so several processes can fill disjoint parts of one file: one creates it at its
/// full (sparse) size with <see cref="Create"/>, the others <see cref="Open"/> it after a barrier. Writes go
/// straight to the operating system (no buffering in this object). Not thread-safe.
/// </summary>
public sealed class NpyWriter : IDisposable
{
    /// <summary>Elements per positional write.</summary>
    private const int PieceElements = 1 << 20;

    /// <summary>NumPy aligns the data to this many bytes.</summary>
    private const int Alignment = 64;

    /// <summary>NumPy pads the header so the first axis can grow in place to this many digits.</summary>
    private const int GrowthAxisMaxDigits = 21;

    private readonly SafeFileHandle _handle;

    private NpyWriter(SafeFileHandle handle, NpyHeader header)
    {
        _handle = handle;
        Header = header;
    }

    /// <summary>The header of the file being written.</summary>
    public NpyHeader Header { get; }

    /// <summary>
    /// Creates (or replaces) <paramref name="path"/> as a float32 C-order array of <paramref name="shape"/>: writes
    /// the header as <c>numpy.save</c> does (format 1.0, or 2.0 when the header exceeds 65535 bytes; data
    /// aligned to 64 bytes) and sets the file to its full length without writing the data, so the file is
    /// sparse (zeros) until written.
    /// </summary>
    /// <param name="path">The file to create.</param>
    /// <param name="shape">The dimensions, outermost first; empty for a 0-d array.</param>
    /// <exception cref="ArgumentException">A negative dimension, or more elements than a 64-bit byte count holds.</exception>
    /// <exception cref="IOException">The file cannot be created.</exception>
    public static NpyWriter Create(string path, IReadOnlyList<long> shape)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ArgumentNullException.ThrowIfNull(shape);
        long elements = 1;
        foreach (long s in shape)
        {
            if (s < 0)
                throw new ArgumentException($"Shape {NpyHeader.FormatShape(shape)} has a negative dimension.", nameof(shape));
            elements = s == 0 ? 0 : elements > long.MaxValue / 4 / s ? throw new ArgumentException(
                $"Shape {NpyHeader.FormatShape(shape)} has too many elements for one file.", nameof(shape)) : elements * s;
        }

        var (bytes, version) = HeaderBytes(shape);
        var header = new NpyHeader(path, NpyDType.Float32, shape.ToArray(), bytes.Length, version);
        SafeFileHandle handle = File.OpenHandle(path, FileMode.Create, FileAccess.ReadWrite, FileShare.ReadWrite | FileShare.Delete);
        try
        {
            RandomAccess.Write(handle, bytes, 0);
            RandomAccess.SetLength(handle, header.DataOffset + header.DataLength);
            return new NpyWriter(handle, header);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Opens a file that <see cref="Create"/> (or NumPy, as <c>&lt;f4</c> C order) already made at its full
    /// length, to write part of it.
    /// </summary>
    /// <param name="path">The existing .npy file.</param>
    /// <exception cref="NpyFormatException">The file is missing, unreadable, not a valid .npy file, not float32, or truncated.</exception>
    public static NpyWriter Open(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        SafeFileHandle handle = NpyReader.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite);
        try
        {
            NpyHeader header = NpyHeader.Read(handle, path);
            if (header.DType != NpyDType.Float32)
                throw new NpyFormatException(path, NpyProblem.UnsupportedDType,
                    $"{path} has dtype '<f2' but NpyWriter writes only float32 '<f4'; create it with NpyWriter.Create.");
            return new NpyWriter(handle, header);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>The header bytes <c>numpy.save</c> writes for a <c>&lt;f4</c> C-order array of this shape, and their version.</summary>
    internal static (byte[] Bytes, (int Major, int Minor) Version) HeaderBytes(IReadOnlyList<long> shape)
    {
        string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': " + NpyHeader.FormatShape(shape) + ", }";
        if (shape.Count > 0)
            dict += new string(' ', Math.Max(0, GrowthAxisMaxDigits - shape[0].ToString(System.Globalization.CultureInfo.InvariantCulture).Length));
        foreach (int major in new[] { 1, 2 })
        {
            int lengthSize = major == 1 ? 2 : 4;
            int textLength = dict.Length + 1; // + '\n'
            int pad = Alignment - ((8 + lengthSize + textLength) % Alignment);
            long headerLength = textLength + pad;
            if (major == 1 && headerLength > ushort.MaxValue)
                continue;
            var bytes = new byte[8 + lengthSize + headerLength];
            NpyHeader.Magic.CopyTo(bytes);
            bytes[6] = (byte)major;
            bytes[7] = 0;
            if (major == 1)
                BinaryPrimitives.WriteUInt16LittleEndian(bytes.AsSpan(8), (ushort)headerLength);
            else
                BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(8), (uint)headerLength);
            int at = 8 + lengthSize;
            at += Encoding.ASCII.GetBytes(dict, bytes.AsSpan(at));
            bytes.AsSpan(at, pad).Fill((byte)' ');
            bytes[^1] = (byte)'\n';
            return (bytes, (major, 0));
        }
        throw new UnreachableException();
    }

    /// <summary>Writes <c>source.Length</c> consecutive elements (C order) starting at element <paramref name="elementOffset"/>.</summary>
    /// <param name="elementOffset">Index of the first element in the flattened array.</param>
    /// <param name="source">The elements.</param>
    /// <exception cref="ArgumentOutOfRangeException">The elements are not all inside the array.</exception>
    public void Write(long elementOffset, ReadOnlySpan<float> source)
    {
        ObjectDisposedException.ThrowIf(_handle.IsClosed, this);
        NpyReader.CheckSpan(Header, elementOffset, source.Length);
        NpyReader.EnsureLittleEndian();
        long byteOffset = Header.DataOffset + elementOffset * 4;
        while (!source.IsEmpty)
        {
            int n = Math.Min(source.Length, PieceElements);
            RandomAccess.Write(_handle, MemoryMarshal.AsBytes(source[..n]), byteOffset);
            source = source[n..];
            byteOffset += (long)n * 4;
        }
    }

    /// <summary>
    /// The mirror of <see cref="NpyReader.ReadTokenRanges"/>: the file's array viewed as <c>[outer, seqLen, inner]</c>;
    /// <paramref name="source"/> is <c>[outer, Σ counts, inner]</c> with the ranges in the given order, and each
    /// range's rows are written at their global token positions.
    /// </summary>
    /// <param name="outer">Product of the dimensions before the token axis.</param>
    /// <param name="seqLen">Length of the token axis (N).</param>
    /// <param name="inner">Product of the dimensions after the token axis.</param>
    /// <param name="ranges">Global token ranges (start, count), e.g. from <see cref="Sharding.Ranges"/>.</param>
    /// <param name="source">The local rows, <c>outer · Σ counts · inner</c> elements.</param>
    /// <exception cref="ArgumentException">The view does not match the file, a range is outside [0, seqLen), or the source has the wrong length.</exception>
    public void WriteTokenRanges(long outer, long seqLen, long inner, IReadOnlyList<(int Start, int Count)> ranges, ReadOnlySpan<float> source)
    {
        int tokens = NpyReader.CheckTokenView(Header, outer, seqLen, inner, ranges, source.Length);
        int rowLength = (int)(tokens * inner);
        for (long o = 0; o < outer; o++)
        {
            ReadOnlySpan<float> row = source.Slice((int)(o * rowLength), rowLength);
            int at = 0;
            foreach (var (start, count) in ranges)
            {
                int n = (int)(count * inner);
                Write((o * seqLen + start) * inner, row.Slice(at, n));
                at += n;
            }
        }
    }

    /// <summary>
    /// Writes go to the operating system as they are made, so there is nothing to flush here; with
    /// <paramref name="toDisk"/> the file's data is also forced to stable storage (fsync).
    /// </summary>
    /// <param name="toDisk">Also fsync the file.</param>
    public void Flush(bool toDisk = false)
    {
        ObjectDisposedException.ThrowIf(_handle.IsClosed, this);
        if (toDisk)
            RandomAccess.FlushToDisk(_handle);
    }

    /// <summary>Closes the file.</summary>
    public void Dispose() => _handle.Dispose();
}
