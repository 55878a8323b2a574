using System.Diagnostics;
using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Cli.Train;

/// <summary>One step's global result, the same on every rank.</summary>
/// <param name="Step">1-based.</param>
/// <param name="Loss">Mean cross-entropy over every answer position of the batch (all ranks), before the update.</param>
/// <param name="LearningRate">The rate of this step's update.</param>
/// <param name="Milliseconds">Wall time of the step on this rank.</param>
internal readonly record struct StepResult(int Step, double Loss, float LearningRate, double Milliseconds);

/// <summary>A finished run: the loss of every step, the held-out accuracy and the training wall time.</summary>
internal sealed record TrainResult(IReadOnlyList<StepResult> Steps, double Accuracy, int HeldOutAnswers, double TrainSeconds);

/// <summary>
/// The training loop of one rank: every rank draws the same global batch from the seed and keeps its tokens
/// (the model's <see cref="HybridModel.LocalTokenRanges"/>); forward and backward run on the local rows, the
/// loss is summed over ranks, the weight gradients are summed with one all-reduce, and every rank takes the
/// same AdamW step, so the weights stay identical on all ranks.
/// </summary>
internal static class TrainRank
{
    public static TrainResult Run(ICommunicator comm, IKernelBackend backend, TrainSettings s, int threads, Action<StepResult>? onStep = null)
    {
        var task = s.Task;
        using var model = new HybridModel(comm, backend, new HostMath(threads), s.Model, s.Seed);
        var adam = new AdamW(model.Parameters);
        var batch = new LocalBatch(task, model, s.Batch);
        var steps = new List<StepResult>(s.Steps);
        var total = Stopwatch.StartNew();
        for (int step = 1; step <= s.Steps; step++)
        {
            var clock = Stopwatch.StartNew();
            batch.Draw(s.Seed, RecallTask.TrainSplit, step, 0);
            var (loss, answers, _) = SumOverRanks(comm, model.Forward(batch.Tokens, batch.Bound, batch.Targets));
            model.Backward(1f / answers);
            var g = model.Parameters.Gradients;
            comm.AllReduceSum(g, g);
            float lr = s.LearningRateAt(step);
            adam.Step(lr);
            var result = new StepResult(step, loss / answers, lr, clock.Elapsed.TotalMilliseconds);
            steps.Add(result);
            onStep?.Invoke(result);
        }
        double trainSeconds = total.Elapsed.TotalSeconds;
        long correct = 0, seen = 0;
        for (int first = 0; first < s.EvalSequences; first += s.Batch)
        {
            batch.Draw(s.Seed, RecallTask.HeldOutSplit, 0, first);
            var (_, answers, right) = SumOverRanks(comm, model.Forward(batch.Tokens, batch.Bound, batch.Targets));
            seen += answers;
            correct += right;
        }
        return new TrainResult(steps, seen == 0 ? double.NaN : correct / (double)seen, (int)seen, trainSeconds);
    }

    /// <summary>
    /// Sums (loss, answers, correct) over ranks in fp64: each rank's fp64 loss travels as two floats (high and low
    /// part), every rank adds all parts in rank order, so the total keeps ~14 digits whatever the rank count.
    /// </summary>
    internal static (double Loss, long Answers, long Correct) SumOverRanks(ICommunicator comm, LocalLoss local)
    {
        float hi = (float)local.LossSum;
        float lo = (float)(local.LossSum - hi);
        var all = new float[4 * comm.Size];
        comm.AllGather([hi, lo, local.Answers, local.Correct], all);
        double loss = 0;
        long answers = 0, correct = 0;
        for (int r = 0; r < comm.Size; r++)
        {
            loss += (double)all[4 * r] + all[4 * r + 1];
            answers += (long)all[4 * r + 2];
            correct += (long)all[4 * r + 3];
        }
        return (loss, answers, correct);
    }
}
