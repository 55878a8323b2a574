using Distributed.Cli.Run;

namespace Distributed.Cli.Check;

/// <summary>
/// Compares one tensor's sampled rows from the run (fp32) with the fp64 reference, accumulating over any number
/// of row slices (and ranks, with <see cref="Merge"/>): max |a − b|, max |ref| and relative = maxErr / max(maxRef, tiny).
/// It fails when the run has a NaN or ±Inf anywhere (counted and reported), when the reference does, when nothing
/// was compared, or when the relative error is above the tolerance.
/// </summary>
internal sealed class CheckComparison(string tensor, double tiny = CheckComparison.DefaultTiny)
{
    /// <summary>The floor of the relative error's denominator.</summary>
    public const double DefaultTiny = 1e-12;

    /// <summary>Tensor name, e.g. "dK".</summary>
    public string Tensor { get; } = tensor;

    /// <summary>Elements compared.</summary>
    public long Elements { get; private set; }

    /// <summary>Run values that are NaN or ±Inf.</summary>
    public long NonFinite { get; private set; }

    /// <summary>Reference values that are NaN or ±Inf (a broken reference also fails).</summary>
    public long NonFiniteReference { get; private set; }

    /// <summary>Index (in the order compared) of the first non-finite run value, or −1.</summary>
    public long FirstNonFinite { get; private set; } = -1;

    /// <summary>max |run − reference| over the finite pairs.</summary>
    public double MaxAbsError { get; private set; }

    /// <summary>max |reference| over the finite pairs.</summary>
    public double MaxAbsReference { get; private set; }

    /// <summary>MaxAbsError / max(MaxAbsReference, tiny).</summary>
    public double RelativeError => MaxAbsError / Math.Max(MaxAbsReference, tiny);

    /// <summary>Adds one slice: run values and the reference's, element for element.</summary>
    public void Add(ReadOnlySpan<float> actual, ReadOnlySpan<double> expected)
    {
        if (actual.Length != expected.Length)
            throw new ArgumentException($"{Tensor}: {actual.Length} run values against {expected.Length} reference values.", nameof(actual));
        for (int i = 0; i < actual.Length; i++)
        {
            double a = actual[i], b = expected[i];
            if (!double.IsFinite(a))
            {
                if (NonFinite++ == 0) FirstNonFinite = Elements + i;
                continue;
            }
            if (!double.IsFinite(b))
            {
                NonFiniteReference++;
                continue;
            }
            MaxAbsError = Math.Max(MaxAbsError, Math.Abs(a - b));
            MaxAbsReference = Math.Max(MaxAbsReference, Math.Abs(b));
        }
        Elements += actual.Length;
    }

    /// <summary>Adds another comparison of the same tensor (another rank's rows).</summary>
    public void Merge(CheckComparison other)
    {
        ArgumentNullException.ThrowIfNull(other);
        if (other.NonFinite > 0 && NonFinite == 0) FirstNonFinite = Elements + other.FirstNonFinite;
        NonFinite += other.NonFinite;
        NonFiniteReference += other.NonFiniteReference;
        MaxAbsError = Math.Max(MaxAbsError, other.MaxAbsError);
        MaxAbsReference = Math.Max(MaxAbsReference, other.MaxAbsReference);
        Elements += other.Elements;
    }

    /// <summary>Whether the check passes at <paramref name="tolerance"/>.</summary>
    public bool Passed(double tolerance) => Failure(tolerance) is null;

    /// <summary>Why the check fails at <paramref name="tolerance"/>, or null when it passes.</summary>
    public string? Failure(double tolerance)
    {
        if (Elements == 0) return $"{Tensor}: no element was compared";
        if (NonFinite > 0) return $"{Tensor}: {NonFinite} of {Elements} run values are NaN or Inf (first at sampled element {FirstNonFinite})";
        if (NonFiniteReference > 0) return $"{Tensor}: {NonFiniteReference} of {Elements} reference values are NaN or Inf";
        double rel = RelativeError;
        if (!(rel <= tolerance)) return $"{Tensor}: relative error {rel:E3} is above the tolerance {tolerance:E3}";
        return null;
    }

    /// <summary>As the CLI reports it; RelativeError is NaN when non-finite values or no elements made it fail.</summary>
    public CheckResult ToResult(double tolerance)
    {
        bool broken = Elements == 0 || NonFinite > 0 || NonFiniteReference > 0;
        return new CheckResult(Tensor, MaxAbsError, MaxAbsReference, broken ? double.NaN : RelativeError, Passed(tolerance));
    }

    /// <summary>One-shot comparison of a single slice.</summary>
    public static CheckComparison Of(string tensor, ReadOnlySpan<float> actual, ReadOnlySpan<double> expected)
    {
        var c = new CheckComparison(tensor);
        c.Add(actual, expected);
        return c;
    }
}
