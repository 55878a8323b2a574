namespace Distributed.IO;

/// <summary>
/// A .npy file that cannot be used: missing, unreadable, not a .npy file, or of a version, dtype, order or
/// shape this layer does not support. The message names the file, what is wrong and how to fix it.
/// </summary>
public sealed class NpyFormatException : IOException
{
    /// <summary>Creates the exception for <paramref name="path"/>.</summary>
    /// <param name="path">The file as the user named it.</param>
    /// <param name="problem">What kind of problem it is.</param>
    /// <param name="message">The full message (file, problem, fix).</param>
    /// <param name="inner">The underlying exception, if any.</param>
    public NpyFormatException(string path, NpyProblem problem, string message, Exception? inner = null)
        : base(message, inner)
    {
        FilePath = path;
        Problem = problem;
    }

    /// <summary>The file as the user named it.</summary>
    public string FilePath { get; }

    /// <summary>What kind of problem it is.</summary>
    public NpyProblem Problem { get; }
}
