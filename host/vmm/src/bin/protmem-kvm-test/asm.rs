//! A few 16-bit real-mode x86 instructions, encoded by hand for the test
//! guests (operand-size prefix 0x66 where a 32-bit register is used).

/// 16-bit register numbers as the `B8+r` and ModRM encodings use them.
#[derive(Clone, Copy, Debug)]
pub enum R {
    Ax = 0,
    Cx = 1,
    Dx = 2,
    Bx = 3,
    Si = 6,
    Di = 7,
}

/// The bytes of a guest program.
#[derive(Default)]
pub struct Asm(pub Vec<u8>);

impl Asm {
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    /// `mov r32, imm32`.
    pub fn mov32(&mut self, r: R, imm: u32) -> &mut Self {
        self.bytes(&[0x66, 0xb8 + r as u8])
            .bytes(&imm.to_le_bytes())
    }

    /// `mov r16, imm16`.
    pub fn mov16(&mut self, r: R, imm: u16) -> &mut Self {
        self.bytes(&[0xb8 + r as u8]).bytes(&imm.to_le_bytes())
    }

    /// `mov ds, ax`.
    pub fn ds_from_ax(&mut self) -> &mut Self {
        self.bytes(&[0x8e, 0xd8])
    }

    /// `mov es, ax`.
    pub fn es_from_ax(&mut self) -> &mut Self {
        self.bytes(&[0x8e, 0xc0])
    }

    /// `mov eax, [addr]`.
    pub fn load_eax(&mut self, addr: u16) -> &mut Self {
        self.bytes(&[0x66, 0xa1]).bytes(&addr.to_le_bytes())
    }

    /// `mov dword [addr], imm32`.
    pub fn store32(&mut self, addr: u16, imm: u32) -> &mut Self {
        self.bytes(&[0x66, 0xc7, 0x06])
            .bytes(&addr.to_le_bytes())
            .bytes(&imm.to_le_bytes())
    }

    /// `out imm8, eax`.
    pub fn out_eax(&mut self, port: u8) -> &mut Self {
        self.bytes(&[0x66, 0xe7, port])
    }

    /// `vmmcall` (AMD) or `vmcall` (Intel).
    pub fn hypercall_insn(&mut self, vmmcall: bool) -> &mut Self {
        self.bytes(if vmmcall {
            &[0x0f, 0x01, 0xd9]
        } else {
            &[0x0f, 0x01, 0xc1]
        })
    }

    /// EAX = `nr`, EBX/ECX/EDX = `args`, then the hypercall instruction.
    pub fn hypercall(&mut self, nr: u64, args: [u32; 3], vmmcall: bool) -> &mut Self {
        self.mov32(R::Ax, nr as u32)
            .mov32(R::Bx, args[0])
            .mov32(R::Cx, args[1])
            .mov32(R::Dx, args[2])
            .hypercall_insn(vmmcall)
    }

    /// `rep insb` (ES:DI, port DX, count CX).
    pub fn rep_insb(&mut self) -> &mut Self {
        self.bytes(&[0xf3, 0x6c])
    }

    /// `rep outsb` (DS:SI, port DX, count CX).
    pub fn rep_outsb(&mut self) -> &mut Self {
        self.bytes(&[0xf3, 0x6e])
    }

    /// `rep movsb` (DS:SI to ES:DI, count CX).
    pub fn rep_movsb(&mut self) -> &mut Self {
        self.bytes(&[0xf3, 0xa4])
    }

    /// KVM's forced emulation prefix (`ud2; .ascii "kvm"`): with
    /// `kvm.force_emulation_prefix`, KVM emulates the next instruction.
    pub fn fep(&mut self) -> &mut Self {
        self.bytes(&[0x0f, 0x0b, b'k', b'v', b'm'])
    }

    /// `lock cmpxchg [addr], ecx` (compares with EAX).
    pub fn lock_cmpxchg_ecx(&mut self, addr: u16) -> &mut Self {
        self.bytes(&[0x66, 0xf0, 0x0f, 0xb1, 0x0e])
            .bytes(&addr.to_le_bytes())
    }

    /// `hlt`.
    pub fn hlt(&mut self) -> &mut Self {
        self.bytes(&[0xf4])
    }

    /// `inc r32`.
    pub fn inc32(&mut self, r: R) -> &mut Self {
        self.bytes(&[0x66, 0x40 + r as u8])
    }

    /// `dec r32`.
    pub fn dec32(&mut self, r: R) -> &mut Self {
        self.bytes(&[0x66, 0x48 + r as u8])
    }

    /// `mov eax, r32`.
    pub fn eax_from(&mut self, r: R) -> &mut Self {
        self.bytes(&[0x66, 0x89, 0xc0 | (r as u8) << 3])
    }

    /// `cmp dword [addr], 0`.
    pub fn cmp_zero32(&mut self, addr: u16) -> &mut Self {
        self.bytes(&[0x66, 0x83, 0x3e])
            .bytes(&addr.to_le_bytes())
            .bytes(&[0])
    }

    /// Where the next instruction goes (a jump target).
    pub fn here(&self) -> usize {
        self.0.len()
    }

    /// `jnz` (`jz` with `zero`) back to `target`, which must be within a
    /// short jump.
    pub fn jcc_back(&mut self, zero: bool, target: usize) -> &mut Self {
        let rel = target as i64 - (self.0.len() + 2) as i64;
        let rel = i8::try_from(rel).expect("a short jump");
        self.bytes(&[if zero { 0x74 } else { 0x75 }, rel as u8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        let mut a = Asm::default();
        a.mov32(R::Cx, 0x1122_3344)
            .mov16(R::Di, 0x4100)
            .ds_from_ax()
            .es_from_ax()
            .load_eax(0x4000)
            .store32(0x5000, 7)
            .out_eax(0xe2)
            .rep_insb()
            .rep_outsb()
            .rep_movsb()
            .fep()
            .lock_cmpxchg_ecx(0x7000)
            .hlt();
        let top = a.here();
        a.inc32(R::Si)
            .dec32(R::Di)
            .eax_from(R::Si)
            .cmp_zero32(0x7000)
            .jcc_back(true, top)
            .jcc_back(false, top);
        assert_eq!(
            a.0,
            [
                0x66, 0xb9, 0x44, 0x33, 0x22, 0x11, // mov ecx
                0xbf, 0x00, 0x41, // mov di
                0x8e, 0xd8, 0x8e, 0xc0, // mov ds/es, ax
                0x66, 0xa1, 0x00, 0x40, // mov eax, [0x4000]
                0x66, 0xc7, 0x06, 0x00, 0x50, 7, 0, 0, 0, // mov dword [0x5000], 7
                0x66, 0xe7, 0xe2, // out 0xe2, eax
                0xf3, 0x6c, 0xf3, 0x6e, 0xf3, 0xa4, // rep ins/outs/movsb
                0x0f, 0x0b, b'k', b'v', b'm', // forced emulation
                0x66, 0xf0, 0x0f, 0xb1, 0x0e, 0x00, 0x70, // lock cmpxchg
                0xf4, 0x66, 0x46, 0x66, 0x4f, // inc esi, dec edi
                0x66, 0x89, 0xf0, // mov eax, esi
                0x66, 0x83, 0x3e, 0x00, 0x70, 0x00, // cmp dword [0x7000], 0
                0x74, 0xf1, 0x75, 0xef, // jz, jnz back to the inc
            ]
        );
    }
}
