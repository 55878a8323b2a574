using System.CommandLine;
using Distributed.Cli.Train;

namespace Distributed.Cli.Commands;

/// <summary>
/// <c>dsattn train</c>: trains a small hybrid model (alternating lightning and softmax attention layers split
/// over ranks) on multi-query associative recall, end to end with hand-written backward and AdamW.
/// </summary>
internal static class TrainCommand
{
    public static Command Create()
    {
        var d = new TrainSettings();
        var ranks = new Option<int>("--ranks") { Description = "In-process ranks (threads) when not launched by mpiexec.", DefaultValueFactory = _ => d.Ranks };
        var steps = new Option<int>("--steps") { Description = "Training steps (one batch each).", DefaultValueFactory = _ => d.Steps };
        var seq = new Option<int>("--seq") { Description = "Tokens per sequence N.", DefaultValueFactory = _ => d.SeqLen };
        var layers = new Option<int>("--layers") { Description = "Attention layers, alternating lightning (even) and softmax (odd).", DefaultValueFactory = _ => d.Layers };
        var dim = new Option<int>("--dim") { Description = "Model width d (a multiple of --heads).", DefaultValueFactory = _ => d.Dim };
        var heads = new Option<int>("--heads") { Description = "Attention heads per layer.", DefaultValueFactory = _ => d.Heads };
        var batch = new Option<int>("--batch") { Description = "Sequences per step.", DefaultValueFactory = _ => d.Batch };
        var pairs = new Option<int>("--pairs") { Description = "Key-value pairs at the start of each sequence.", DefaultValueFactory = _ => d.Pairs };
        var queries = new Option<int>("--queries") { Description = "Queries per sequence (in its second half); the loss counts these positions only.", DefaultValueFactory = _ => d.Queries };
        var keys = new Option<int>("--keys") { Description = "Distinct keys (tokens) the pairs draw from.", DefaultValueFactory = _ => d.Keys };
        var values = new Option<int>("--values") { Description = "Distinct values (tokens); chance accuracy is 1/values.", DefaultValueFactory = _ => d.Values };
        var softmaxSchemes = SchemeRegistry.NamesFor(AttentionKind.Softmax).ToArray();
        var lightningSchemes = SchemeRegistry.NamesFor(AttentionKind.Lightning).ToArray();
        var softmax = new Option<string>("--softmax-scheme") { Description = $"How softmax layers are split: {string.Join(", ", softmaxSchemes)}.", DefaultValueFactory = _ => "allgather" };
        softmax.AcceptOnlyFromAmong(softmaxSchemes);
        var lightning = new Option<string>("--lightning-scheme") { Description = $"How lightning layers are split: {string.Join(", ", lightningSchemes)} (lasp1 needs --layout contiguous).", DefaultValueFactory = _ => "lasp2" };
        lightning.AcceptOnlyFromAmong(lightningSchemes);
        var layout = new Option<string>("--layout") { Description = "Token layout of every layer: zigzag or contiguous.", DefaultValueFactory = _ => "zigzag" };
        layout.AcceptOnlyFromAmong("zigzag", "contiguous");
        var seed = new Option<ulong>("--seed") { Description = "Seed of the weights and of the data.", DefaultValueFactory = _ => d.Seed };
        var lr = new Option<float>("--lr") { Description = "Peak AdamW learning rate (linear warm-up, cosine decay to 10%).", DefaultValueFactory = _ => d.LearningRate };
        var eval = new Option<int>("--eval-sequences") { Description = "Held-out sequences for the final recall accuracy.", DefaultValueFactory = _ => d.EvalSequences };
        var plot = new Option<string?>("--plot") { Description = "Write the loss curve(s) to this PNG (ScottPlot)." };
        var json = new Option<string?>("--json") { Description = "Write the settings, the loss of every step and the accuracy to this JSON file." };
        var compare = new Option<string?>("--compare-ranks") { Description = "In-process: train once per rank count (e.g. 1,2,4) and print each count's loss on every step line." };
        var progress = new Option<bool>("--progress") { Description = "With --compare-ranks: report every 50th step on standard error." };
        var command = new Command("train", "Train a small hybrid model (lightning and softmax attention layers split over ranks) on multi-query associative recall: in-process ranks by default, MPI ranks under mpiexec. Prints 'step <n> loss <value>' per step, then the held-out accuracy.")
        {
            ranks, steps, seq, layers, dim, heads, batch, pairs, queries, keys, values, softmax, lightning, layout, seed, lr, eval, plot, json, compare, progress,
        };
        command.SetAction(parse =>
        {
            int[]? counts;
            try
            {
                counts = parse.GetValue(compare) is { } c
                    ? [.. c.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(x => int.Parse(x, System.Globalization.CultureInfo.InvariantCulture))]
                    : null;
            }
            catch (Exception e) when (e is FormatException or OverflowException)
            {
                return TrainExecution.Refuse("--compare-ranks takes comma-separated rank counts, e.g. 1,2,4.");
            }
            var settings = new TrainSettings
            {
                Ranks = parse.GetValue(ranks),
                Steps = parse.GetValue(steps),
                SeqLen = parse.GetValue(seq),
                Layers = parse.GetValue(layers),
                Dim = parse.GetValue(dim),
                Heads = parse.GetValue(heads),
                Batch = parse.GetValue(batch),
                Pairs = parse.GetValue(pairs),
                Queries = parse.GetValue(queries),
                Keys = parse.GetValue(keys),
                Values = parse.GetValue(values),
                SoftmaxScheme = ParseScheme(parse.GetValue(softmax)!),
                LightningScheme = ParseScheme(parse.GetValue(lightning)!),
                Layout = parse.GetValue(layout) == "contiguous" ? ShardLayout.Contiguous : ShardLayout.Zigzag,
                Seed = parse.GetValue(seed),
                LearningRate = parse.GetValue(lr),
                EvalSequences = parse.GetValue(eval),
                PlotPath = parse.GetValue(plot),
                JsonPath = parse.GetValue(json),
                CompareRanks = counts,
                Progress = parse.GetValue(progress),
            };
            return TrainExecution.Execute(settings);
        });
        return command;
    }

    private static ParallelScheme ParseScheme(string name) => SchemeRegistry.Parse(name);
}
