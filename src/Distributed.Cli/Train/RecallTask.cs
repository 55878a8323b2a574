namespace Distributed.Cli.Train;

/// <summary>
/// Multi-query associative recall (after Zoology's MQAR) with bound pairs: a sequence opens with
/// <c>Pairs</c> positions that each hold one key bound to one value (distinct keys; the position's input is the
/// key's embedding plus the value's), then filler, and in its second half <c>Queries</c> positions hold one of
/// the keys alone. At each query the model must output the value bound to that key at the start, up to N
/// positions back: the task needs attention across the whole sequence. The loss and the accuracy count the
/// query positions only.
/// </summary>
/// <remarks>
/// Binding key and value at one position makes the lookup one softmax attention (query key against stored
/// keys, read the stored value), which this small model learns in a few hundred steps; with key and value as
/// two consecutive tokens it must first build an induction circuit (measured here: no progress past chance
/// in 1,500 steps at N = 64). Vocabulary: keys <c>[0, Keys)</c>, values <c>[Keys, Keys + Values)</c>, then
/// one filler token. Every sequence is drawn from its own stream of the seed (split, step, index), so the
/// data never depends on the rank count.
/// </remarks>
internal sealed record RecallTask(int SeqLen, int Pairs, int Queries, int Keys, int Values)
{
    /// <summary>The streams: training batches and held-out sequences never share one.</summary>
    public const ulong TrainSplit = 1, HeldOutSplit = 2;

    /// <summary>Keys, values and the filler token.</summary>
    public int Vocabulary => Keys + Values + 1;

    /// <summary>The filler token.</summary>
    public int Filler => Keys + Values;

    private int FirstQuery => Math.Max(Pairs, SeqLen / 2);

    /// <summary>A clear message when the sizes cannot make a sequence, else null.</summary>
    public string? Problem()
    {
        if (Pairs < 1) return $"--pairs must be at least 1 (got {Pairs}).";
        if (Queries < 1) return $"--queries must be at least 1 (got {Queries}).";
        if (Keys < Pairs) return $"there are {Keys} keys but {Pairs} pairs need distinct keys; use fewer pairs.";
        if (Values < 2) return $"at least 2 values are needed (got {Values}).";
        if (SeqLen - FirstQuery < Queries)
            return $"--seq {SeqLen} leaves {Math.Max(0, SeqLen - FirstQuery)} positions for {Queries} queries after the {Pairs} pairs and the first half; use --seq {2 * Math.Max(Pairs, Queries)} or more.";
        return null;
    }

    /// <summary>
    /// Sequences <c>[first, first + count)</c> of (split, step), each array <c>[count, N]</c>: the token of each
    /// position, the value bound to it (−1: none), and the target (the value at a query, −1 elsewhere).
    /// </summary>
    public void Generate(ulong seed, ulong split, long step, int first, int count, int[] tokens, int[] bound, int[] targets)
    {
        var keys = new int[Keys];
        var values = new int[Pairs];
        var positions = new int[SeqLen];
        for (int s = 0; s < count; s++)
        {
            var rng = new SplitMix64(SplitMix64.Mix(SplitMix64.Mix(SplitMix64.Mix(seed, split), (ulong)step), (ulong)(first + s)));
            var tok = tokens.AsSpan(s * SeqLen, SeqLen);
            var bnd = bound.AsSpan(s * SeqLen, SeqLen);
            var tgt = targets.AsSpan(s * SeqLen, SeqLen);
            tok.Fill(Filler);
            bnd.Fill(-1);
            tgt.Fill(-1);
            for (int i = 0; i < Keys; i++) keys[i] = i;
            for (int p = 0; p < Pairs; p++)
            {
                int j = p + rng.NextInt(Keys - p);
                (keys[p], keys[j]) = (keys[j], keys[p]);
                values[p] = Keys + rng.NextInt(Values);
                tok[p] = keys[p];
                bnd[p] = values[p];
            }
            // Distinct query positions in the second half (after the pairs).
            int span = SeqLen - FirstQuery;
            for (int i = 0; i < span; i++) positions[i] = FirstQuery + i;
            for (int qi = 0; qi < Queries; qi++)
            {
                int j = qi + rng.NextInt(span - qi);
                (positions[qi], positions[j]) = (positions[j], positions[qi]);
                int p = rng.NextInt(Pairs);
                tok[positions[qi]] = keys[p];
                tgt[positions[qi]] = values[p];
            }
        }
    }
}
