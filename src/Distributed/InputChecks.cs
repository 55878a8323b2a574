using System.Globalization;
using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed;

/// <summary>
/// The input checks of <see cref="SequenceParallelAttention"/> that go beyond the basic shape rules: each throws an
/// <see cref="ArgumentException"/> whose message names the parameter and says how to fix it. Split by when they can
/// run: <see cref="Options"/> needs only the shape and options; <see cref="Partition"/> also needs P, so a launcher
/// runs it once before any rank starts; <see cref="AgreeAcrossRanks"/> is collective (one small all-gather) and
/// makes every rank fail alike when the ranks were given different shapes or options, rather than hang in a
/// collective of mismatched lengths; <see cref="LocalTensors"/> checks the tensors a rank passes to Forward/Backward.
/// </summary>
internal static class InputChecks
{
    /// <summary>
    /// Options that are out of range, or that do not apply to the chosen attention kind or scheme (an option
    /// that would be silently ignored is refused, so a typo in a job description cannot go unnoticed).
    /// </summary>
    /// <exception cref="ArgumentException">The message names the option and the fix.</exception>
    public static void Options(AttentionShape s, SequenceParallelOptions o)
    {
        if (!Enum.IsDefined(o.Attention))
            throw new ArgumentException($"Attention {(int)o.Attention} is not an attention kind; use Softmax or Lightning.", "options");
        if (!Enum.IsDefined(o.Scheme))
            throw new ArgumentException($"Scheme {(int)o.Scheme} is not a scheme; use one of {string.Join(", ", Enum.GetNames<ParallelScheme>())}.", "options");
        if (o.Layout is { } layout && !Enum.IsDefined(layout))
            throw new ArgumentException($"Layout {(int)layout} is not a layout; use Contiguous, Zigzag, or null for the scheme's best.", "options");
        if (float.IsNaN(o.Scale) || float.IsInfinity(o.Scale) || o.Scale < 0)
            throw new ArgumentException($"Scale {o.Scale.ToString(CultureInfo.InvariantCulture)} is not a usable softmax scale; give a positive finite number, or 0 for 1/sqrt(D) = {1 / Math.Sqrt(s.HeadDim):G6}.", "options");
        if (o.UlyssesDegree < 0)
            throw new ArgumentException($"UlyssesDegree {o.UlyssesDegree} is negative; give the ranks per head group (a divisor of P and H), or 0 to choose it.", "options");
        if (o.Attention == AttentionKind.Softmax)
        {
            if (o.Decay is not null)
                throw new ArgumentException("Decay applies to lightning attention only; softmax attention has no decay. Drop Decay (set it to null) or use Attention = Lightning.", "options");
        }
        else
        {
            if (o.Scale != 0)
                throw new ArgumentException($"Scale applies to softmax attention only; lightning attention does not scale q·k (got Scale = {o.Scale.ToString(CultureInfo.InvariantCulture)}). Leave Scale at 0.", "options");
            if (o.Decay is { } d)
            {
                for (int h = 0; h < d.Length; h++)
                    if (!(d[h] > 0f && d[h] <= 1f))
                        throw new ArgumentException($"Decay[{h}] = {d[h].ToString(CultureInfo.InvariantCulture)} is outside (0, 1]; every λ must be in (0, 1] (1 means no decay).", "options");
            }
        }
        if (o.Scheme != ParallelScheme.Hybrid)
        {
            if (o.UlyssesDegree != 0)
                throw new ArgumentException($"UlyssesDegree applies to the Hybrid scheme only (got {o.UlyssesDegree} with {o.Scheme}); leave it at 0 or use Scheme = Hybrid.", "options");
            if (o.HybridSequenceScheme != ParallelScheme.AllGather)
                throw new ArgumentException($"HybridSequenceScheme applies to the Hybrid scheme only (got {o.HybridSequenceScheme} with {o.Scheme}); leave it at AllGather or use Scheme = Hybrid.", "options");
        }
        else if (o.Attention == AttentionKind.Lightning && o.HybridSequenceScheme != ParallelScheme.AllGather)
            throw new ArgumentException($"HybridSequenceScheme {o.HybridSequenceScheme} applies to softmax attention; lightning hybrid always runs LASP-2 across head groups. Leave it at AllGather.", "options");
        else if (o.Attention == AttentionKind.Softmax && !SchemeRegistry.Describe(o.HybridSequenceScheme).HybridSequenceScheme)
            throw new ArgumentException($"HybridSequenceScheme must be one of {string.Join(", ", SchemeRegistry.All.Where(x => x.HybridSequenceScheme).Select(x => x.Scheme))} (got {o.HybridSequenceScheme}).", "options");
    }

    /// <summary>
    /// The checks that depend on P: Ulysses needs H % P == 0; every layout needs at least one token per chunk
    /// (P chunks contiguous, 2P zigzag); the hybrid's Ulysses degree must divide P and H, and each head group must
    /// hold at least one token per rank. Runs before ranks start (launchers call
    /// <see cref="SequenceParallelAttention.CheckFits"/>), so the refusal is printed once, not by every rank.
    /// </summary>
    /// <exception cref="ArgumentException">The message names the parameter and the fix.</exception>
    public static void Partition(AttentionShape s, SequenceParallelOptions o, ShardLayout layout, int ranks)
    {
        // The scheme's own P-dependent checks (Ulysses: H % P; hybrid: its degree and head groups) live in its descriptor.
        var scheme = SchemeRegistry.Get(o.Scheme);
        scheme.Validate(s, o with { Layout = layout }, ranks);
        int sequenceRanks = scheme.SequenceRanks(s, o, ranks);
        int need = layout == ShardLayout.Zigzag ? 2 * sequenceRanks : sequenceRanks;
        string over = sequenceRanks == ranks ? $"{ranks} ranks" : $"{sequenceRanks} head-group ranks";
        if (s.SeqLen < need)
            throw new ArgumentException($"SeqLen {s.SeqLen} is shorter than the {need} chunks a {Name(layout)} layout over {over} needs; use a sequence of at least {need} tokens or fewer ranks{(layout == ShardLayout.Zigzag ? " (or Layout = Contiguous)" : "")}.", "shape");
    }

    /// <summary>The divisors of <paramref name="heads"/> up to <paramref name="ranks"/>, as text.</summary>
    internal static string DivisorsText(int heads, int ranks) => Divisors(heads, ranks);

    /// <summary>"contiguous" or "zigzag".</summary>
    internal static string LayoutName(ShardLayout layout) => Name(layout);

    /// <summary>
    /// Collective: every rank contributes a fingerprint of its shape and options (one all-gather of
    /// <see cref="FingerprintLength"/> floats) and compares it with rank 0's. Ranks that were given different shapes
    /// or options would otherwise enter collectives of different lengths (a hang under MPI, or wrong numbers);
    /// here every rank throws the same error naming the first field that differs and the ranks that disagree.
    /// </summary>
    /// <exception cref="ArgumentException">The ranks disagree.</exception>
    public static void AgreeAcrossRanks(ICommunicator communicator, AttentionShape s, SequenceParallelOptions o, ShardLayout layout)
    {
        var mine = Fingerprint(s, o, layout);
        if (communicator.Size == 1) return;
        var all = new float[mine.Length * communicator.Size];
        communicator.AllGather(mine, all);
        for (int r = 1; r < communicator.Size; r++)
            for (int f = 0; f < Fields.Length; f++)
            {
                long first = Decode(all, f), other = Decode(all.AsSpan(r * mine.Length), f);
                if (first != other)
                    throw new ArgumentException($"The ranks were given different shapes or options: rank 0 has {Fields[f]} = {Show(f, first)} but rank {r} has {Show(f, other)}. Every rank must construct SequenceParallelAttention with the same global shape and options.", Fields[f] is "Batch" or "SeqLen" or "Heads" or "KvHeads" or "HeadDim" or "ValueDim" ? "shape" : "options");
            }
    }

    /// <summary>
    /// The local tensors of one rank's Forward or Backward: each must be 4-D <c>[B, Nloc, heads, dim]</c> with the
    /// global B, heads and dims and this rank's token count.
    /// </summary>
    /// <exception cref="ArgumentException">The wrong tensor is named, with the shape it must have.</exception>
    public static void LocalTensors(AttentionShape s, int localTokens, params (DeviceTensor Tensor, string Name, int Heads, int Dim)[] tensors)
    {
        foreach (var (t, name, heads, dim) in tensors)
        {
            ArgumentNullException.ThrowIfNull(t, name);
            if (t.Shape.Count != 4)
                throw new ArgumentException($"{name} is {t}, a {t.Shape.Count}-D tensor, but must be 4-D [B={s.Batch}, Nloc={localTokens}, {heads}, {dim}] (this rank's tokens, LocalTokens).", name);
            if (t.Shape[0] != s.Batch || t.Shape[1] != localTokens || t.Shape[2] != heads || t.Shape[3] != dim)
                throw new ArgumentException($"{name} is {t} but must be [B={s.Batch}, Nloc={localTokens}, {heads}, {dim}]: the global B, heads and dims, and this rank's LocalTokens.", name);
        }
    }

    /// <summary>Floats in one rank's fingerprint: two 16-bit halves per field, each exact in a float.</summary>
    internal static int FingerprintLength => 2 * Fields.Length;

    private static readonly string[] Fields =
        ["Batch", "SeqLen", "Heads", "KvHeads", "HeadDim", "ValueDim", "Attention", "Scheme", "Causal", "Layout", "Scale", "Decay", "UlyssesDegree", "HybridSequenceScheme"];

    private static float[] Fingerprint(AttentionShape s, SequenceParallelOptions o, ShardLayout layout)
    {
        int decayHash = 0;
        if (o.Decay is { } d)
        {
            // HashCode is seeded per process, so the ranks of an MPI job fold the bits by hand instead.
            decayHash = d.Aggregate(d.Length, (acc, l) => unchecked(acc * 31 + BitConverter.SingleToInt32Bits(l)));
        }
        int[] values =
        [
            s.Batch, s.SeqLen, s.Heads, s.KvHeads, s.HeadDim, s.ValueDim, (int)o.Attention, (int)o.Scheme, o.Causal ? 1 : 0,
            (int)layout, BitConverter.SingleToInt32Bits(o.Scale), decayHash, o.UlyssesDegree, (int)o.HybridSequenceScheme,
        ];
        var f = new float[2 * values.Length];
        for (int i = 0; i < values.Length; i++)
        {
            uint u = unchecked((uint)values[i]);
            f[2 * i] = u >> 16;
            f[2 * i + 1] = u & 0xFFFF;
        }
        return f;
    }

    private static long Decode(ReadOnlySpan<float> f, int field) => unchecked((int)(((uint)f[2 * field] << 16) | (uint)f[2 * field + 1]));

    private static string Show(int field, long value) => Fields[field] switch
    {
        "Attention" => ((AttentionKind)value).ToString(),
        "Scheme" or "HybridSequenceScheme" => ((ParallelScheme)value).ToString(),
        "Layout" => ((ShardLayout)value).ToString(),
        "Causal" => value != 0 ? "true" : "false",
        "Scale" => BitConverter.Int32BitsToSingle((int)value).ToString(CultureInfo.InvariantCulture),
        "Decay" => $"a different list (hash {value:x8})",
        _ => value.ToString(CultureInfo.InvariantCulture),
    };

    private static string Name(ShardLayout layout) => layout.ToString().ToLowerInvariant();

    private static string Divisors(int heads, int ranks) =>
        string.Join(" or ", Enumerable.Range(1, ranks).Where(d => heads % d == 0).Reverse().Take(3));
}
