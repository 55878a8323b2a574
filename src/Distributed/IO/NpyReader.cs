using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Distributed.IO;

/// <summary>
/// Reads elements of a .npy file (format 1.0/2.0/3.0, C order, <c>&lt;f4</c> or <c>&lt;f2</c>) as float32 at any
/// 64-bit element offset, with positional reads (<see cref="RandomAccess"/>) so several ranks can read disjoint
/// parts of one file. float16 files are converted to float32 on read. Not thread-safe: one reader per thread.
/// </summary>
public sealed class NpyReader : IDisposable
{
    /// <summary>Elements per positional read, so no single read nears the 2 GiB span limit.</summary>
    private const int PieceElements = 1 << 20;

    /// <summary>Bytes of the reused float16 staging buffer.</summary>
    private const int HalfBufferBytes = 1 << 16;

    private readonly SafeFileHandle _handle;
    private byte[]? _halfBuffer;

    private NpyReader(SafeFileHandle handle, NpyHeader header)
    {
        _handle = handle;
        Header = header;
    }

    /// <summary>The parsed, validated header.</summary>
    public NpyHeader Header { get; }

    /// <summary>
    /// Opens <paramref name="path"/> for reading, parses and validates its header, and checks that the file
    /// holds all the data the header describes.
    /// </summary>
    /// <param name="path">The .npy file.</param>
    /// <exception cref="NpyFormatException">
    /// The file is missing or unreadable, or is not a supported .npy file (magic, version, dtype, Fortran order,
    /// malformed header, truncated data); the message names the file, the problem and the fix.
    /// </exception>
    public static NpyReader Open(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        SafeFileHandle handle = OpenHandle(path, FileMode.Open, FileAccess.Read);
        try
        {
            return new NpyReader(handle, NpyHeader.Read(handle, path));
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>Opens a file handle, turning the usual failures into <see cref="NpyFormatException"/>.</summary>
    internal static SafeFileHandle OpenHandle(string path, FileMode mode, FileAccess access)
    {
        try
        {
            return File.OpenHandle(path, mode, access, FileShare.ReadWrite | FileShare.Delete);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            throw new NpyFormatException(path, NpyProblem.Missing,
                $"{path} does not exist (looked for {Path.GetFullPath(path)}); check the path.", e);
        }
        catch (Exception e) when (e is UnauthorizedAccessException or IOException)
        {
            throw NpyHeader.Unreadable(path, e);
        }
    }

    /// <summary>
    /// Reads <c>destination.Length</c> consecutive elements (C order) starting at element
    /// <paramref name="elementOffset"/>, converting float16 to float32.
    /// </summary>
    /// <param name="elementOffset">Index of the first element in the flattened array.</param>
    /// <param name="destination">Receives the elements.</param>
    /// <exception cref="ArgumentOutOfRangeException">The elements are not all inside the array.</exception>
    /// <exception cref="NpyFormatException">A read failed or the file shrank since it was opened.</exception>
    public void Read(long elementOffset, Span<float> destination)
    {
        ObjectDisposedException.ThrowIf(_handle.IsClosed, this);
        CheckSpan(Header, elementOffset, destination.Length);
        EnsureLittleEndian();
        long byteOffset = Header.DataOffset + elementOffset * Header.ElementSize;
        if (Header.DType == NpyDType.Float32)
        {
            while (!destination.IsEmpty)
            {
                int n = Math.Min(destination.Length, PieceElements);
                ReadExactly(MemoryMarshal.AsBytes(destination[..n]), byteOffset);
                destination = destination[n..];
                byteOffset += (long)n * 4;
            }
        }
        else
        {
            _halfBuffer ??= new byte[HalfBufferBytes];
            while (!destination.IsEmpty)
            {
                int n = Math.Min(destination.Length, HalfBufferBytes / 2);
                Span<byte> bytes = _halfBuffer.AsSpan(0, n * 2);
                ReadExactly(bytes, byteOffset);
                ReadOnlySpan<Half> halves = MemoryMarshal.Cast<byte, Half>(bytes);
                for (int i = 0; i < n; i++)
                    destination[i] = (float)halves[i];
                destination = destination[n..];
                byteOffset += (long)n * 2;
            }
        }
    }

    /// <summary>
    /// Reads the rows of some token ranges. The file's array, viewed as <c>[outer, seqLen, inner]</c> (token axis in
    /// the middle), must have exactly <c>outer·seqLen·inner</c> elements; <paramref name="destination"/> is
    /// <c>[outer, Σ counts, inner]</c> with the ranges in the given order. Q <c>[B, N, H, D]</c> is
    /// outer = B, inner = H·D; LSE <c>[B, H, N]</c> is outer = B·H, inner = 1.
    /// </summary>
    /// <param name="outer">Product of the dimensions before the token axis.</param>
    /// <param name="seqLen">Length of the token axis (N).</param>
    /// <param name="inner">Product of the dimensions after the token axis.</param>
    /// <param name="ranges">Global token ranges (start, count), e.g. from <see cref="Sharding.Ranges"/>.</param>
    /// <param name="destination">Receives <c>outer · Σ counts · inner</c> elements.</param>
    /// <exception cref="ArgumentException">The view does not match the file, a range is outside [0, seqLen), or the destination has the wrong length.</exception>
    public void ReadTokenRanges(long outer, long seqLen, long inner, IReadOnlyList<(int Start, int Count)> ranges, Span<float> destination)
    {
        int tokens = CheckTokenView(Header, outer, seqLen, inner, ranges, destination.Length);
        int rowLength = (int)(tokens * inner);
        for (long o = 0; o < outer; o++)
        {
            Span<float> row = destination.Slice((int)(o * rowLength), rowLength);
            int at = 0;
            foreach (var (start, count) in ranges)
            {
                int n = (int)(count * inner);
                Read((o * seqLen + start) * inner, row.Slice(at, n));
                at += n;
            }
        }
    }

    /// <summary>Checks a token-range view against the header; returns Σ counts.</summary>
    internal static int CheckTokenView(NpyHeader header, long outer, long seqLen, long inner, IReadOnlyList<(int Start, int Count)> ranges, int bufferLength)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        ArgumentOutOfRangeException.ThrowIfNegative(outer);
        ArgumentOutOfRangeException.ThrowIfNegative(seqLen);
        ArgumentOutOfRangeException.ThrowIfNegative(inner);
        long elements;
        try
        {
            elements = checked(outer * seqLen * inner);
        }
        catch (OverflowException)
        {
            elements = -1;
        }
        if (elements != header.ElementCount)
            throw new ArgumentException(
                $"{header.Path} has shape {header.ShapeText} ({header.ElementCount} elements), which cannot be viewed as [outer {outer}, seqLen {seqLen}, inner {inner}].",
                nameof(seqLen));
        long tokens = 0;
        foreach (var (start, count) in ranges)
        {
            if (start < 0 || count < 0 || start + (long)count > seqLen)
                throw new ArgumentException($"Token range ({start}, {count}) is outside [0, {seqLen}).", nameof(ranges));
            tokens += count;
        }
        long needed = outer * tokens * inner;
        if (needed != bufferLength)
            throw new ArgumentException(
                $"The buffer has {bufferLength} elements but [outer {outer}, tokens {tokens}, inner {inner}] needs {needed}.", nameof(bufferLength));
        return (int)tokens;
    }

    /// <summary>Checks that <c>[offset, offset + length)</c> lies inside the array.</summary>
    internal static void CheckSpan(NpyHeader header, long elementOffset, int length)
    {
        if (elementOffset < 0 || elementOffset > header.ElementCount - length)
            throw new ArgumentOutOfRangeException(nameof(elementOffset),
                $"Elements [{elementOffset}, {elementOffset + length}) are outside the {header.ElementCount} elements of {header.Path}.");
    }

    /// <summary>The data path reinterprets bytes as little-endian floats.</summary>
    internal static void EnsureLittleEndian()
    {
        if (!BitConverter.IsLittleEndian)
            throw new PlatformNotSupportedException(".npy data I/O assumes a little-endian machine.");
    }

    private void ReadExactly(Span<byte> buffer, long offset)
    {
        try
        {
            while (!buffer.IsEmpty)
            {
                int n = RandomAccess.Read(_handle, buffer, offset);
                if (n == 0)
                    throw new NpyFormatException(Header.Path, NpyProblem.Truncated,
                        $"{Header.Path} ended at byte {offset} while reading its data; was it truncated while open? Write the file again in full.");
                buffer = buffer[n..];
                offset += n;
            }
        }
        catch (IOException e) when (e is not NpyFormatException)
        {
            throw NpyHeader.Unreadable(Header.Path, e);
        }
    }

    /// <summary>Closes the file.</summary>
    public void Dispose() => _handle.Dispose();
}
