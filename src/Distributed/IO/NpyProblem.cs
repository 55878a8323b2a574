namespace Distributed.IO;

/// <summary>What is wrong with a .npy file, carried by <see cref="NpyFormatException.Problem"/>.</summary>
public enum NpyProblem
{
    /// <summary>The file does not exist (or its folder does not).</summary>
    Missing,

    /// <summary>The file exists but cannot be opened or read (permissions, a folder, an I/O error).</summary>
    Unreadable,

    /// <summary>The file does not start with the NumPy magic <c>\x93NUMPY</c>.</summary>
    BadMagic,

    /// <summary>The format version is not 1.0, 2.0 or 3.0.</summary>
    UnsupportedVersion,

    /// <summary>The <c>descr</c> is not little-endian float32 or float16.</summary>
    UnsupportedDType,

    /// <summary>The array is stored in Fortran (column-major) order.</summary>
    FortranOrder,

    /// <summary>The file is shorter than its header says the data needs.</summary>
    Truncated,

    /// <summary>The header cannot be parsed (bad length, bad text, missing or unknown keys).</summary>
    MalformedHeader,

    /// <summary>The file is valid but its shape is not what the caller needs.</summary>
    WrongShape,
}
