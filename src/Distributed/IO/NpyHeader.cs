using System.Buffers.Binary;
using System.Globalization;
using System.Text;
using Microsoft.Win32.SafeHandles;

namespace Distributed.IO;

/// <summary>
/// The parsed header of a .npy file (NumPy format 1.0, 2.0 or 3.0), C order, little-endian float32 or float16.
/// </summary>
/// <param name="Path">The file as the caller named it (used in messages).</param>
/// <param name="DType">The element type.</param>
/// <param name="Shape">The dimensions, outermost first; empty for a 0-d (scalar) array.</param>
/// <param name="DataOffset">Byte offset of the first element (magic + version + length field + header text).</param>
/// <param name="Version">The format version (major, minor): (1, 0), (2, 0) or (3, 0).</param>
public sealed record NpyHeader(string Path, NpyDType DType, long[] Shape, long DataOffset, (int Major, int Minor) Version)
{
    /// <summary>The longest header text accepted (bytes); NumPy itself writes a few hundred.</summary>
    internal const long MaxHeaderBytes = 1L << 24;

    /// <summary>The six bytes every .npy file starts with.</summary>
    internal static ReadOnlySpan<byte> Magic => [0x93, (byte)'N', (byte)'U', (byte)'M', (byte)'P', (byte)'Y'];

    /// <summary>Number of elements: the product of <see cref="Shape"/> (1 for a 0-d array).</summary>
    public long ElementCount => Product(Shape);

    /// <summary>Bytes per element in the file: 4 for float32, 2 for float16.</summary>
    public int ElementSize => DType == NpyDType.Float32 ? 4 : 2;

    /// <summary>Bytes of element data: <see cref="ElementCount"/> × <see cref="ElementSize"/>.</summary>
    public long DataLength => ElementCount * ElementSize;

    /// <summary>The shape as Python writes a tuple: <c>()</c>, <c>(5,)</c>, <c>(2, 3)</c>.</summary>
    public string ShapeText => FormatShape(Shape);

    /// <summary>
    /// Throws unless the array has <paramref name="rank"/> dimensions, e.g.
    /// "--q Q.npy has shape (2, 100, 8) but must be 4-D [B, N, H, D]".
    /// </summary>
    /// <param name="rank">The number of dimensions required.</param>
    /// <param name="parameterName">The option or parameter that named the file, e.g. <c>--q</c>.</param>
    /// <param name="layout">The layout in words, e.g. <c>[B, N, H, D]</c>.</param>
    /// <exception cref="NpyFormatException">The rank differs (<see cref="NpyProblem.WrongShape"/>).</exception>
    public void ExpectRank(int rank, string parameterName, string layout)
    {
        if (Shape.Length != rank)
            throw new NpyFormatException(Path, NpyProblem.WrongShape,
                $"{parameterName} {Path} has shape {ShapeText} but must be {rank}-D {layout}.");
    }

    /// <summary>
    /// Throws unless the shape equals <paramref name="expected"/>, where a negative entry matches any size, e.g.
    /// "--k K.npy has shape (2, 100, 8, 64) but must be [B, N, Hk, D] = (2, 100, 8, 32)".
    /// </summary>
    /// <param name="parameterName">The option or parameter that named the file, e.g. <c>--k</c>.</param>
    /// <param name="layout">The layout in words, e.g. <c>[B, N, Hk, D]</c>.</param>
    /// <param name="expected">The required dimensions; negative means "any".</param>
    /// <exception cref="NpyFormatException">The rank or a dimension differs (<see cref="NpyProblem.WrongShape"/>).</exception>
    public void ExpectShape(string parameterName, string layout, params long[] expected)
    {
        ArgumentNullException.ThrowIfNull(expected);
        bool ok = Shape.Length == expected.Length;
        for (int i = 0; ok && i < expected.Length; i++)
            ok = expected[i] < 0 || expected[i] == Shape[i];
        if (!ok)
        {
            string want = "(" + string.Join(", ", expected.Select(e => e < 0 ? "*" : e.ToString(CultureInfo.InvariantCulture)))
                + (expected.Length == 1 ? ",)" : ")");
            throw new NpyFormatException(Path, NpyProblem.WrongShape,
                $"{parameterName} {Path} has shape {ShapeText} but must be {layout} = {want}.");
        }
    }

    /// <summary>A shape as Python's <c>repr</c> of a tuple writes it.</summary>
    internal static string FormatShape(IReadOnlyList<long> shape) => shape.Count switch
    {
        0 => "()",
        1 => "(" + shape[0].ToString(CultureInfo.InvariantCulture) + ",)",
        _ => "(" + string.Join(", ", shape.Select(s => s.ToString(CultureInfo.InvariantCulture))) + ")",
    };

    private static long Product(IReadOnlyList<long> shape)
    {
        long n = 1;
        foreach (long s in shape)
            n = checked(n * s);
        return n;
    }

    /// <summary>Reads and validates the header of an open file, including that the data fits in the file.</summary>
    /// <exception cref="NpyFormatException">Any problem with the file.</exception>
    internal static NpyHeader Read(SafeFileHandle handle, string path)
    {
        long fileLength;
        try
        {
            fileLength = RandomAccess.GetLength(handle);
        }
        catch (IOException e)
        {
            throw Unreadable(path, e);
        }

        Span<byte> prefix = stackalloc byte[12];
        int got = ReadAtMost(handle, path, prefix, 0);
        if (got < 8 || !prefix[..6].SequenceEqual(Magic))
        {
            string found = Convert.ToHexString(prefix[..Math.Min(got, 6)]);
            throw new NpyFormatException(path, NpyProblem.BadMagic,
                $"{path} is not a .npy file: it does not start with the NumPy magic 93 4E 55 4D 50 59 (\\x93NUMPY)"
                + $" but with {(got == 0 ? "nothing (the file is empty)" : found)}; save the array with numpy.save.");
        }

        int major = prefix[6], minor = prefix[7];
        if (minor != 0 || major is < 1 or > 3)
            throw new NpyFormatException(path, NpyProblem.UnsupportedVersion,
                $"{path} has .npy format version {major}.{minor}; supported are 1.0, 2.0 and 3.0. Save it again with numpy.save.");

        int lengthSize = major == 1 ? 2 : 4;
        if (got < 8 + lengthSize)
            throw Malformed(path, $"the file ends inside the header length field ({fileLength} bytes in all)");
        long headerLength = major == 1
            ? BinaryPrimitives.ReadUInt16LittleEndian(prefix[8..])
            : BinaryPrimitives.ReadUInt32LittleEndian(prefix[8..]);
        if (headerLength > MaxHeaderBytes)
            throw Malformed(path, $"the header length field says {headerLength} bytes, more than the {MaxHeaderBytes} accepted");
        long dataOffset = 8 + lengthSize + headerLength;
        if (dataOffset > fileLength)
            throw Malformed(path, $"the header length field says the header ends at byte {dataOffset} but the file has only {fileLength} bytes");

        byte[] headerBytes = new byte[headerLength];
        if (ReadAtMost(handle, path, headerBytes, 8 + lengthSize) != headerLength)
            throw Malformed(path, "the file ended while reading the header");

        string text;
        try
        {
            text = major == 3
                ? new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(headerBytes)
                : Encoding.Latin1.GetString(headerBytes);
        }
        catch (DecoderFallbackException e)
        {
            throw Malformed(path, $"the version 3.0 header is not valid UTF-8 ({e.Message})");
        }

        var (dtype, fortran, shape) = ParseDictionary(path, text);
        if (fortran)
            throw new NpyFormatException(path, NpyProblem.FortranOrder,
                $"{path} is stored in Fortran (column-major) order ('fortran_order': True); only C order is supported."
                + " Save it with numpy.save(path, numpy.ascontiguousarray(a)).");

        var header = new NpyHeader(path, dtype, shape, dataOffset, (major, minor));
        long dataLength;
        try
        {
            dataLength = header.DataLength;
        }
        catch (OverflowException)
        {
            throw Malformed(path, $"the shape {FormatShape(shape)} has more elements than a 64-bit count holds");
        }
        if (fileLength - dataOffset < dataLength)
            throw new NpyFormatException(path, NpyProblem.Truncated,
                $"{path} is truncated: shape {FormatShape(shape)} of {(dtype == NpyDType.Float32 ? "<f4" : "<f2")} needs"
                + $" {dataOffset} + {dataLength} = {dataOffset + dataLength} bytes but the file has only {fileLength} bytes."
                + " Copy or write the file again in full.");
        return header;
    }

    /// <summary>Reads up to <c>buffer.Length</c> bytes at <paramref name="offset"/>; fewer only at end of file.</summary>
    private static int ReadAtMost(SafeFileHandle handle, string path, Span<byte> buffer, long offset)
    {
        int total = 0;
        try
        {
            while (total < buffer.Length)
            {
                int n = RandomAccess.Read(handle, buffer[total..], offset + total);
                if (n == 0)
                    break;
                total += n;
            }
        }
        catch (IOException e)
        {
            throw Unreadable(path, e);
        }
        catch (UnauthorizedAccessException e)
        {
            throw Unreadable(path, e);
        }
        return total;
    }

    internal static NpyFormatException Unreadable(string path, Exception e) =>
        new(path, NpyProblem.Unreadable, $"{path} cannot be read: {e.Message}. Check the path and its permissions.", e);

    private static NpyFormatException Malformed(string path, string what) =>
        new(path, NpyProblem.MalformedHeader,
            $"{path} has a malformed .npy header: {what}. Save the array again with numpy.save.");

    private static (NpyDType DType, bool Fortran, long[] Shape) ParseDictionary(string path, string text)
    {
        var parser = new LiteralParser(text);
        Dictionary<string, object?> dict;
        try
        {
            dict = parser.ParseHeader();
        }
        catch (FormatException e)
        {
            throw Malformed(path, $"{e.Message} in {Quote(text)}");
        }

        foreach (string key in dict.Keys)
            if (key is not ("descr" or "fortran_order" or "shape"))
                throw Malformed(path, $"unexpected key '{key}' (a .npy header has exactly 'descr', 'fortran_order' and 'shape')");
        foreach (string key in new[] { "descr", "fortran_order", "shape" })
            if (!dict.ContainsKey(key))
                throw Malformed(path, $"the key '{key}' is missing");

        if (dict["fortran_order"] is not bool fortran)
            throw Malformed(path, $"'fortran_order' is {Show(dict["fortran_order"])}, not True or False");

        if (dict["shape"] is not List<object?> { } dims || !parser.LastShapeWasTuple(dims))
            throw Malformed(path, $"'shape' is {Show(dict["shape"])}, not a tuple of integers");
        var shape = new long[dims.Count];
        for (int i = 0; i < dims.Count; i++)
        {
            if (dims[i] is not long d || d < 0)
                throw Malformed(path, $"'shape' is {Show(dims)}, not a tuple of non-negative integers");
            shape[i] = d;
        }

        NpyDType dtype = dict["descr"] switch
        {
            "<f4" or "=f4" or "|f4" or "f4" => NpyDType.Float32,
            "<f2" or "=f2" or "|f2" or "f2" => NpyDType.Float16,
            var other => throw UnsupportedDType(path, other),
        };
        return (dtype, fortran, shape);
    }

    private static NpyFormatException UnsupportedDType(string path, object? descr)
    {
        string found = Show(descr);
        string hint = descr is string s && s.StartsWith('>')
            ? " (big-endian)"
            : descr is List<object?> ? " (a structured dtype)" : "";
        return new NpyFormatException(path, NpyProblem.UnsupportedDType,
            $"{path} has dtype {found}{hint}; only little-endian float32 '<f4' and float16 '<f2' are supported."
            + " Convert it with numpy.save(path, a.astype('<f4')).");
    }

    private static string Quote(string text)
    {
        string t = text.TrimEnd();
        return "\"" + (t.Length > 200 ? t[..200] + "…" : t) + "\"";
    }

    private static string Show(object? value) => value switch
    {
        null => "None",
        string s => "'" + s + "'",
        bool b => b ? "True" : "False",
        long l => l.ToString(CultureInfo.InvariantCulture),
        List<object?> list => "(" + string.Join(", ", list.Select(Show)) + ")",
        _ => value.ToString() ?? "?",
    };

    /// <summary>
    /// The subset of Python literals a .npy header uses: a dict of string keys whose values are strings,
    /// True/False/None, integers (optionally with Python 2's L suffix), tuples and lists.
    /// </summary>
    private sealed class LiteralParser(string text)
    {
        private readonly HashSet<List<object?>> _tuples = new(ReferenceEqualityComparer.Instance);
        private const int MaxNesting = 32;
        private int _pos;
        private int _depth;

        public bool LastShapeWasTuple(List<object?> value) => _tuples.Contains(value);

        public Dictionary<string, object?> ParseHeader()
        {
            SkipSpace();
            Expect('{');
            var dict = new Dictionary<string, object?>(StringComparer.Ordinal);
            while (true)
            {
                SkipSpace();
                if (Peek() == '}')
                {
                    _pos++;
                    break;
                }
                if (ParseValue() is not string key)
                    throw new FormatException($"a dictionary key at character {_pos} is not a string");
                SkipSpace();
                Expect(':');
                if (!dict.TryAdd(key, ParseValue()))
                    throw new FormatException($"the key '{key}' appears twice");
                SkipSpace();
                if (Peek() == ',')
                    _pos++;
                else if (Peek() != '}')
                    throw new FormatException($"expected ',' or '}}' at character {_pos}");
            }
            SkipSpace();
            if (_pos != text.Length)
                throw new FormatException($"unexpected text after the dictionary at character {_pos}");
            return dict;
        }

        private object? ParseValue()
        {
            SkipSpace();
            char c = Peek();
            if (c is '\'' or '"')
                return ParseString(c);
            if (c is '(' or '[')
                return ParseSequence(c);
            if (c == '-' || char.IsAsciiDigit(c))
                return ParseInteger();
            if (char.IsAsciiLetter(c))
            {
                int start = _pos;
                while (_pos < text.Length && char.IsAsciiLetterOrDigit(text[_pos]))
                    _pos++;
                return text[start.._pos] switch
                {
                    "True" => true,
                    "False" => false,
                    "None" => null,
                    var word => throw new FormatException($"unknown name '{word}' at character {start}"),
                };
            }
            throw new FormatException(_pos >= text.Length ? "the text ends where a value is expected" : $"unexpected '{c}' at character {_pos}");
        }

        private string ParseString(char quote)
        {
            _pos++;
            var sb = new StringBuilder();
            while (true)
            {
                if (_pos >= text.Length)
                    throw new FormatException("a string is not closed");
                char c = text[_pos++];
                if (c == quote)
                    return sb.ToString();
                if (c == '\\')
                {
                    if (_pos >= text.Length)
                        throw new FormatException("a string is not closed");
                    c = text[_pos++];
                }
                sb.Append(c);
            }
        }

        private List<object?> ParseSequence(char open)
        {
            char close = open == '(' ? ')' : ']';
            // A header's values nest at most two deep (a structured dtype's list of tuples); refusing deeper nesting
            // keeps a hostile header of up to MaxHeaderBytes from recursing until the stack overflows.
            if (++_depth > MaxNesting)
                throw new FormatException($"brackets nest more than {MaxNesting} deep at character {_pos}");
            _pos++;
            var items = new List<object?>();
            bool comma = false;
            while (true)
            {
                SkipSpace();
                if (Peek() == close)
                {
                    _pos++;
                    break;
                }
                items.Add(ParseValue());
                SkipSpace();
                comma = Peek() == ',';
                if (comma)
                    _pos++;
                else if (Peek() != close)
                    throw new FormatException($"expected ',' or '{close}' at character {_pos}");
            }
            _depth--;
            // (n) without a comma is a parenthesized integer in Python, not a tuple.
            if (open == '(' && (items.Count != 1 || comma))
                _tuples.Add(items);
            return items;
        }

        private long ParseInteger()
        {
            int start = _pos;
            if (Peek() == '-')
                _pos++;
            while (_pos < text.Length && char.IsAsciiDigit(text[_pos]))
                _pos++;
            string digits = text[start.._pos];
            if (_pos < text.Length && text[_pos] is 'L' or 'l')
                _pos++;
            if (!long.TryParse(digits, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out long value))
                throw new FormatException($"the integer '{digits}' at character {start} is not a 64-bit integer");
            return value;
        }

        private void SkipSpace()
        {
            while (_pos < text.Length && char.IsWhiteSpace(text[_pos]))
                _pos++;
        }

        private char Peek() => _pos < text.Length ? text[_pos] : '\0';

        private void Expect(char c)
        {
            if (Peek() != c)
                throw new FormatException($"expected '{c}' at character {_pos}");
            _pos++;
        }
    }
}
