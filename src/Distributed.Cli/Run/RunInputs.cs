using System.Globalization;
using Distributed.Cli.Check;
using Distributed.IO;

namespace Distributed.Cli.Run;

/// <summary>The rows of a 4-D .npy tensor <c>[B, N, heads, dim]</c>, read at their file offsets.</summary>
internal sealed class NpyTokenRows : ITokenRows, IDisposable
{
    private readonly NpyReader _reader;

    public NpyTokenRows(string path)
    {
        _reader = NpyReader.Open(path);
        var shape = _reader.Header.Shape;
        Batch = (int)shape[0];
        SeqLen = shape[1];
        Width = checked((int)(shape[2] * shape[3]));
    }

    public int Batch { get; }

    public long SeqLen { get; }

    public int Width { get; }

    public void Read(int batch, long tokenStart, int count, Span<float> destination)
    {
        TokenRowsAccess.CheckRead(this, batch, tokenStart, count, destination.Length);
        _reader.Read((batch * SeqLen + tokenStart) * Width, destination[..(count * Width)]);
    }

    public void Dispose() => _reader.Dispose();
}

/// <summary>Where a job's Q, K, V and dO come from: synthetic values, or .npy files.</summary>
internal sealed class RunInputs : IDisposable
{
    private RunInputs(ITokenRows q, ITokenRows k, ITokenRows v, ITokenRows? dOut)
    {
        Q = q; K = k; V = v; DOut = dOut;
    }

    /// <summary>Q <c>[B, N, H·D]</c>.</summary>
    public ITokenRows Q { get; }

    /// <summary>K <c>[B, N, Hk·D]</c>.</summary>
    public ITokenRows K { get; }

    /// <summary>V <c>[B, N, Hk·Dv]</c>.</summary>
    public ITokenRows V { get; }

    /// <summary>dO <c>[B, N, H·Dv]</c>, or null without backward.</summary>
    public ITokenRows? DOut { get; }

    /// <summary>Opens the job's inputs: the files when given, else the deterministic synthetic values.</summary>
    public static RunInputs Open(RunSettings s, JobSpec job, AttentionShape shape)
    {
        if (s.Files.HasInputs)
            return new RunInputs(new NpyTokenRows(s.Files.Q!), new NpyTokenRows(s.Files.K!), new NpyTokenRows(s.Files.V!),
                s.Backward ? new NpyTokenRows(s.Files.DOut!) : null);
        // Lightning has no softmax normalisation: smaller inputs keep long causal sums in a readable range.
        float amplitude = job.Attention == AttentionKind.Lightning ? 0.25f : 1f;
        int b = shape.Batch, n = shape.SeqLen;
        return new RunInputs(
            new SyntheticTokenRows(s.Seed, SyntheticInputs.Query, b, n, shape.Heads * shape.HeadDim, amplitude),
            new SyntheticTokenRows(s.Seed, SyntheticInputs.Key, b, n, shape.KvHeads * shape.HeadDim, amplitude),
            new SyntheticTokenRows(s.Seed, SyntheticInputs.Values, b, n, shape.KvHeads * shape.ValueDim, 1f),
            s.Backward ? new SyntheticTokenRows(s.Seed, SyntheticInputs.OutputGradient, b, n, shape.Heads * shape.ValueDim, 1f) : null);
    }

    public void Dispose()
    {
        foreach (var rows in new[] { Q, K, V, DOut })
            (rows as IDisposable)?.Dispose();
    }

    /// <summary>
    /// Reads the input files' headers (before any rank starts) and returns the global shape they define,
    /// checking that the files agree with each other and with the shape options given.
    /// </summary>
    /// <exception cref="ArgumentException">A missing file option, a shape mismatch; the message names both sides.</exception>
    /// <exception cref="NpyFormatException">A file that is not a usable .npy.</exception>
    public static AttentionShape ShapeFromFiles(RunFiles f, bool backward, ShapeOptions given)
    {
        if (f.K is null || f.V is null) throw new ArgumentException("--q needs --k and --v as well (K [B, N, Hk, D] and V [B, N, Hk, Dv]).", "k");
        if (backward && f.DOut is null) throw new ArgumentException("--backward with file inputs needs --dout DO.npy ([B, N, H, Dv], the gradient of O).", "dout");
        long[] q = Shape4(f.Q!, "--q", "[B, N, H, D]"), k = Shape4(f.K, "--k", "[B, N, Hk, D]"), v = Shape4(f.V, "--v", "[B, N, Hk, Dv]");
        Same("--k", f.K, k, 0, "B", "--q", f.Q!, q, 0);
        Same("--k", f.K, k, 1, "N", "--q", f.Q!, q, 1);
        Same("--k", f.K, k, 3, "D", "--q", f.Q!, q, 3);
        Same("--v", f.V, v, 0, "B", "--q", f.Q!, q, 0);
        Same("--v", f.V, v, 1, "N", "--q", f.Q!, q, 1);
        Same("--v", f.V, v, 2, "Hk", "--k", f.K, k, 2);
        if (q[2] % k[2] != 0)
            throw new ArgumentException($"--q {f.Q} has H = {q[2]} heads and --k {f.K} has Hk = {k[2]}; GQA needs H % Hk == 0.", "k");
        if (backward)
        {
            long[] d = Shape4(f.DOut!, "--dout", "[B, N, H, Dv]");
            Same("--dout", f.DOut!, d, 0, "B", "--q", f.Q!, q, 0);
            Same("--dout", f.DOut!, d, 1, "N", "--q", f.Q!, q, 1);
            Same("--dout", f.DOut!, d, 2, "H", "--q", f.Q!, q, 2);
            Same("--dout", f.DOut!, d, 3, "Dv", "--v", f.V, v, 3);
        }
        Given(given.Batch, "--batch", q[0], "B", f.Q!);
        Given(given.SeqLen, "--seq", q[1], "N", f.Q!);
        Given(given.Heads, "--heads", q[2], "H", f.Q!);
        Given(given.KvHeads, "--kv-heads", k[2], "Hk", f.K);
        Given(given.HeadDim, "--head-dim", q[3], "D", f.Q!);
        Given(given.ValueDim, "--value-dim", v[3], "Dv", f.V);
        return new AttentionShape(Int(q[0], "B", f.Q!), Int(q[1], "N", f.Q!), Int(q[2], "H", f.Q!), Int(k[2], "Hk", f.K), Int(q[3], "D", f.Q!), Int(v[3], "Dv", f.V));
    }

    private static long[] Shape4(string path, string option, string layout)
    {
        using var reader = NpyReader.Open(path);
        long[] shape = [.. reader.Header.Shape];
        if (shape.Length != 4)
            throw new ArgumentException($"{option} {path} has shape {Text(shape)} but must be 4-D {layout}.", option.TrimStart('-'));
        if (shape.Any(x => x < 1))
            throw new ArgumentException($"{option} {path} has shape {Text(shape)}: every dimension of {layout} must be at least 1.", option.TrimStart('-'));
        return shape;
    }

    private static void Same(string option, string path, long[] shape, int axis, string dim, string otherOption, string otherPath, long[] other, int otherAxis)
    {
        if (shape[axis] != other[otherAxis])
            throw new ArgumentException($"{option} {path} has {dim} = {shape[axis]} (shape {Text(shape)}) but {otherOption} {otherPath} has {dim} = {other[otherAxis]} (shape {Text(other)}); the files must agree.", option.TrimStart('-'));
    }

    private static void Given(int? value, string option, long fromFile, string dim, string path)
    {
        if (value is { } v && v != fromFile)
            throw new ArgumentException($"{option} {v} disagrees with {path}, which has {dim} = {fromFile}; drop {option} (shapes come from the files) or fix the file.", option.TrimStart('-'));
    }

    private static int Int(long value, string dim, string path) =>
        value <= int.MaxValue ? (int)value : throw new ArgumentException($"{path}: {dim} = {value} is above {int.MaxValue}, the most this runtime takes.", dim);

    private static string Text(long[] shape) => "(" + string.Join(", ", shape.Select(x => x.ToString(CultureInfo.InvariantCulture))) + ")";
}
