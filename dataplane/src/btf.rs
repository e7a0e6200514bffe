//! A minimal reader of the `.BTF` section of a BPF object: struct layouts and enum values, which
//! is what the ABI layout test needs to compare `abi.h` with its Rust mirror. Format: the
//! kernel's Documentation/bpf/btf.rst ("2. BTF Type and String Encoding").

use object::{Object, ObjectSection};

const BTF_MAGIC: u16 = 0xeb9f;

// BTF_KIND_* values and the size of the data that follows each type's 12-byte header.
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// Why a blob is not readable BTF.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not an ELF object: {0}")]
    Elf(String),
    #[error("the object has no .BTF section")]
    NoSection,
    #[error("bad BTF magic {0:#06x}")]
    Magic(u16),
    #[error("BTF truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown BTF kind {0}")]
    UnknownKind(u32),
}

/// A struct member: its name and bit offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub offset_bits: usize,
}

/// A struct's size and members, in declaration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructLayout {
    pub size: usize,
    pub members: Vec<Member>,
}

#[derive(Debug)]
enum Type {
    Struct {
        name: String,
        layout: StructLayout,
    },
    Enum {
        name: String,
        values: Vec<(String, i64)>,
    },
    Other,
}

/// The structs and enums of one BTF blob.
#[derive(Debug)]
pub struct Btf {
    types: Vec<Type>,
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn u32_at(&self, at: usize) -> Result<u32, BtfError> {
        let raw = self.bytes.get(at..at + 4).ok_or(BtfError::Truncated(at))?;
        Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
    }

    fn str_at(&self, strings: usize, strings_len: usize, offset: u32) -> Result<String, BtfError> {
        let start = strings + offset as usize;
        let end = strings + strings_len;
        let table = self
            .bytes
            .get(start..end)
            .ok_or(BtfError::Truncated(start))?;
        let len = table
            .iter()
            .position(|b| *b == 0)
            .ok_or(BtfError::Truncated(end))?;
        Ok(String::from_utf8_lossy(&table[..len]).into_owned())
    }
}

impl Btf {
    /// Reads the `.BTF` section of an ELF object (little-endian, as built for x86_64 hosts).
    pub fn from_elf(elf: &[u8]) -> Result<Self, BtfError> {
        let file = object::File::parse(elf).map_err(|e| BtfError::Elf(e.to_string()))?;
        let section = file.section_by_name(".BTF").ok_or(BtfError::NoSection)?;
        let data = section.data().map_err(|e| BtfError::Elf(e.to_string()))?;
        Self::parse(data)
    }

    /// Parses a raw BTF blob (header, types, strings).
    pub fn parse(bytes: &[u8]) -> Result<Self, BtfError> {
        let r = Reader { bytes };
        let magic = u16::from_le_bytes([
            *bytes.first().ok_or(BtfError::Truncated(0))?,
            *bytes.get(1).ok_or(BtfError::Truncated(1))?,
        ]);
        if magic != BTF_MAGIC {
            return Err(BtfError::Magic(magic));
        }
        let hdr_len = r.u32_at(4)? as usize;
        let type_off = r.u32_at(8)? as usize;
        let type_len = r.u32_at(12)? as usize;
        let str_off = r.u32_at(16)? as usize;
        let str_len = r.u32_at(20)? as usize;
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings = hdr_len + str_off;
        if bytes.len() < types_end || bytes.len() < strings + str_len {
            return Err(BtfError::Truncated(bytes.len()));
        }
        let name = |off: u32| r.str_at(strings, str_len, off);

        let mut types = Vec::new();
        let mut at = types_start;
        while at < types_end {
            let name_off = r.u32_at(at)?;
            let info = r.u32_at(at + 4)?;
            let size = r.u32_at(at + 8)? as usize;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = r.u32_at(m + 8)?;
                        // With kind_flag the low 24 bits are the offset, the top 8 the bitfield size.
                        let offset_bits = if kind_flag {
                            offset & 0x00ff_ffff
                        } else {
                            offset
                        };
                        members.push(Member {
                            name: name(r.u32_at(m)?)?,
                            offset_bits: offset_bits as usize,
                        });
                    }
                    at += vlen * 12;
                    if kind == KIND_STRUCT {
                        Type::Struct {
                            name: name(name_off)?,
                            layout: StructLayout { size, members },
                        }
                    } else {
                        Type::Other
                    }
                }
                KIND_ENUM => {
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let e = at + i * 8;
                        // Signedness is in kind_flag; the ABI's enums are small and positive.
                        let value = r.u32_at(e + 4)? as i32 as i64;
                        values.push((name(r.u32_at(e)?)?, value));
                    }
                    at += vlen * 8;
                    Type::Enum {
                        name: name(name_off)?,
                        values,
                    }
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => {
                    at += 4;
                    Type::Other
                }
                KIND_ARRAY => {
                    at += 12;
                    Type::Other
                }
                KIND_FUNC_PROTO => {
                    at += vlen * 8;
                    Type::Other
                }
                KIND_DATASEC | KIND_ENUM64 => {
                    at += vlen * 12;
                    Type::Other
                }
                2 | 7..=12 | 16 | 18 => Type::Other,
                other => return Err(BtfError::UnknownKind(other)),
            };
            types.push(ty);
        }
        Ok(Self { types })
    }

    /// The layout of `struct <name>`, if the blob defines it.
    pub fn struct_layout(&self, wanted: &str) -> Option<&StructLayout> {
        self.types.iter().find_map(|t| match t {
            Type::Struct { name, layout } if name == wanted => Some(layout),
            _ => None,
        })
    }

    /// The enumerators of `enum <name>`, if the blob defines it.
    pub fn enum_values(&self, wanted: &str) -> Option<Vec<(String, i64)>> {
        self.types.iter().find_map(|t| match t {
            Type::Enum { name, values } if name == wanted => Some(values.clone()),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_magic_and_truncation() {
        assert_eq!(Btf::parse(&[]).unwrap_err(), BtfError::Truncated(0));
        assert_eq!(
            Btf::parse(&[0x12, 0x34]).unwrap_err(),
            BtfError::Magic(0x3412)
        );
        let mut header = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        header.extend_from_slice(&[0, 0, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            Btf::parse(&header).unwrap_err(),
            BtfError::Truncated(_)
        ));
    }

    #[test]
    fn reads_structs_from_the_compiled_object() {
        let btf = Btf::from_elf(crate::objects::POD_VETH).expect("BTF");
        let key = btf.struct_layout("counter_key").expect("counter_key");
        assert_eq!(key.size, 12);
        assert_eq!(key.members.len(), 3);
        assert!(btf.struct_layout("no_such_struct").is_none());
    }
}
