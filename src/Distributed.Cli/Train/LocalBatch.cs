namespace Distributed.Cli.Train;

/// <summary>
/// This rank's tokens and targets of a batch, <c>[B, Nloc]</c> in local order: the global batch is drawn in full
/// (cheap) and the rows of the model's <see cref="HybridModel.LocalTokenRanges"/> are kept.
/// </summary>
internal sealed class LocalBatch(RecallTask task, HybridModel model, int batch)
{
    private readonly int[] _tokens = new int[batch * task.SeqLen], _bound = new int[batch * task.SeqLen], _targets = new int[batch * task.SeqLen];

    public int[] Tokens { get; } = new int[batch * model.LocalTokens];

    public int[] Bound { get; } = new int[batch * model.LocalTokens];

    public int[] Targets { get; } = new int[batch * model.LocalTokens];

    public void Draw(ulong seed, ulong split, long step, int first)
    {
        task.Generate(seed, split, step, first, batch, _tokens, _bound, _targets);
        int local = 0;
        for (int b = 0; b < batch; b++)
            foreach (var (start, count) in model.LocalTokenRanges)
            {
                Array.Copy(_tokens, b * task.SeqLen + start, Tokens, local, count);
                Array.Copy(_bound, b * task.SeqLen + start, Bound, local, count);
                Array.Copy(_targets, b * task.SeqLen + start, Targets, local, count);
                local += count;
            }
    }
}
