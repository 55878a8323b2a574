namespace Distributed.Cli.Train;

/// <summary>
/// Multi-query associative recall (Zoology's MQAR): a sequence opens with <c>Pairs</c> key–value pairs
/// (distinct keys), then filler, and in its second half <c>Queries</c> positions repeat one of the keys.
/// At each such position the model must output the value that followed that key at the start, so the
/// answer is up to N tokens back: the task needs attention across the whole sequence. The loss and the
/// accuracy count the query positions only.
/// </summary>
/// <remarks>
/// Vocabulary: keys <c>[0, Keys)</c>, values <c>[Keys, Keys + Values)</c>, then one filler token. Every sequence
/// is drawn from its own stream of the seed (split, step, index), so the data never depends on the rank count.
/// </remarks>
internal sealed record RecallTask(int SeqLen, int Pairs, int Queries, int Keys, int Values)
{
    /// <summary>The streams: training batches and held-out sequences never share one.</summary>
    public const ulong TrainSplit = 1, HeldOutSplit = 2;

    /// <summary>Keys, values and the filler token.</summary>
    public int Vocabulary => Keys + Values + 1;

    /// <summary>The filler token.</summary>
    public int Filler => Keys + Values;

    /// <summary>A clear message when the sizes cannot make a sequence, else null.</summary>
    public string? Problem()
    {
        if (Pairs < 1) return $"--pairs must be at least 1 (got {Pairs}).";
        if (Queries < 1) return $"--queries must be at least 1 (got {Queries}).";
        if (Keys < Pairs) return $"there are {Keys} keys but {Pairs} pairs need distinct keys; use fewer pairs.";
        if (Values < 2) return $"at least 2 values are needed (got {Values}).";
        int firstQuery = Math.Max(2 * Pairs, SeqLen / 2);
        if (SeqLen - firstQuery < Queries)
            return $"--seq {SeqLen} leaves {Math.Max(0, SeqLen - firstQuery)} positions for {Queries} queries after the {Pairs} pairs and the first half; use --seq {2 * Math.Max(2 * Pairs, Queries) + 2} or more.";
        return null;
    }

    /// <summary>
    /// Sequences <c>[first, first + count)</c> of (split, step): <paramref name="tokens"/> and
    /// <paramref name="targets"/> are <c>[count, N]</c>; a target is the value token at a query position and −1 elsewhere.
    /// </summary>
    public void Generate(ulong seed, ulong split, long step, int first, int count, int[] tokens, int[] targets)
    {
        var keys = new int[Keys];
        var positions = new int[SeqLen];
        for (int s = 0; s < count; s++)
        {
            var rng = new SplitMix64(SplitMix64.Mix(SplitMix64.Mix(SplitMix64.Mix(seed, split), (ulong)step), (ulong)(first + s)));
            var tok = tokens.AsSpan(s * SeqLen, SeqLen);
            var tgt = targets.AsSpan(s * SeqLen, SeqLen);
            tok.Fill(Filler);
            tgt.Fill(-1);
            for (int i = 0; i < Keys; i++) keys[i] = i;
            var values = new int[Pairs];
            for (int p = 0; p < Pairs; p++)
            {
                int j = p + rng.NextInt(Keys - p);
                (keys[p], keys[j]) = (keys[j], keys[p]);
                values[p] = Keys + rng.NextInt(Values);
                tok[2 * p] = keys[p];
                tok[2 * p + 1] = values[p];
            }
            // Distinct query positions in the second half (after the pairs).
            int firstQuery = Math.Max(2 * Pairs, SeqLen / 2), span = SeqLen - firstQuery;
            for (int i = 0; i < span; i++) positions[i] = firstQuery + i;
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
