namespace Distributed.IO;

/// <summary>The element types the .npy layer reads: little-endian IEEE float32 (<c>&lt;f4</c>) and float16 (<c>&lt;f2</c>).</summary>
public enum NpyDType
{
    /// <summary>IEEE 754 binary32, 4 bytes, descr <c>&lt;f4</c>.</summary>
    Float32,

    /// <summary>IEEE 754 binary16, 2 bytes, descr <c>&lt;f2</c>; converted to float32 on read.</summary>
    Float16,
}
