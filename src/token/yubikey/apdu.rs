//! The PIV commands mxhsm sends itself, over its own PC/SC connection to the card.
//!
//! `yubikey` 0.9.0-rc.0 cannot sign every message Matrix produces: its GENERAL
//! AUTHENTICATE builder panics on a message of exactly 255 bytes (it counts two length
//! bytes where the TLV writer uses three) and refuses anything over 1014 bytes (a fixed
//! 1024-byte buffer); see docs/tokens.md. Its transaction type is
//! private, so these commands go through a second shared connection to the same reader.
//! The card's security status (PIN verified, management key authenticated) belongs to the
//! card, not to a connection, so what the crate's connection verified holds here too, as
//! long as nobody selects the PIV application again in between.
//!
//! Also here: DELETE KEY (MOVE KEY with destination FF, firmware 5.7), which the crate
//! does not have.

use std::ffi::CString;

/// PIV algorithm identifier of Ed25519 keys (YubiKey firmware 5.7).
pub const ALG_ED25519: u8 = 0xe0;

/// The longest message mxhsm sends to be signed. Matrix events are at most 64 KiB; the
/// headroom is for JSON that is signed before it is sent. (How much a real YubiKey accepts
/// in one chained command is checked by the hardware test, not assumed.)
pub const MAX_MESSAGE: usize = 1 << 20;

/// The longest answer collected with GET RESPONSE (a card that never stops answering
/// 61 XX must not grow memory for ever).
const MAX_ANSWER: usize = 64 * 1024;

const INS_VERIFY: u8 = 0x20;
const INS_SELECT: u8 = 0xa4;
const AID_PIV: [u8; 5] = [0xa0, 0x00, 0x00, 0x03, 0x08];
const INS_GENERAL_AUTHENTICATE: u8 = 0x87;
const INS_GET_RESPONSE: u8 = 0xc0;
const INS_MOVE_KEY: u8 = 0xf6;

/// A status word other than 90 00, or a transport failure.
#[derive(Debug)]
pub enum ApduError {
    Pcsc(pcsc::Error),
    Status(u16),
    Malformed(&'static str),
}

impl std::fmt::Display for ApduError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApduError::Pcsc(e) => write!(f, "PC/SC: {e}"),
            ApduError::Status(sw) => write!(f, "the card answered {sw:04X} ({})", describe(*sw)),
            ApduError::Malformed(what) => write!(f, "malformed answer: {what}"),
        }
    }
}

impl ApduError {
    /// Whether the card lost the state mxhsm set up: `Some(true)` when it was reset (by
    /// another program), `Some(false)` when it no longer has the PIN verified or PIV
    /// selected (another program selected an application), `None` otherwise.
    pub fn lost_state(&self) -> Option<bool> {
        match self {
            ApduError::Pcsc(pcsc::Error::ResetCard) => Some(true),
            ApduError::Status(0x6982 | 0x6d00) => Some(false),
            _ => None,
        }
    }
}

impl From<pcsc::Error> for ApduError {
    fn from(e: pcsc::Error) -> Self {
        ApduError::Pcsc(e)
    }
}

/// What a PIV status word means, for error messages.
pub fn describe(sw: u16) -> &'static str {
    match sw {
        0x6982 => {
            "security status not satisfied: PIN not verified, touch not given, or management key not authenticated"
        }
        0x6983 => "authentication method blocked",
        0x6985 => "conditions of use not satisfied",
        0x6a80 => "incorrect data",
        0x6a86 => "incorrect P1/P2",
        0x6a88 => "no key in this slot",
        0x6d00 => "instruction not supported by this firmware",
        0x6700 => "wrong length",
        _ => "unexpected status",
    }
}

/// A second connection to the reader the `yubikey` crate opened.
pub struct RawCard {
    card: pcsc::Card,
}

impl RawCard {
    pub fn connect(reader: &str) -> Result<RawCard, ApduError> {
        let ctx = pcsc::Context::establish(pcsc::Scope::User)?;
        let name = CString::new(reader).map_err(|_| ApduError::Malformed("reader name"))?;
        let card = ctx.connect(&name, pcsc::ShareMode::Shared, pcsc::Protocols::T1)?;
        Ok(RawCard { card })
    }

    /// A pure Ed25519 signature over `message` (at most [`MAX_MESSAGE`] bytes) in one
    /// chained command.
    pub fn sign_ed25519(&mut self, slot: u8, message: &[u8]) -> Result<[u8; 64], ApduError> {
        // 7C { 82 (empty: the response goes here), 81 message (the challenge) }
        let mut inner = vec![0x82, 0x00, 0x81];
        push_len(&mut inner, message.len());
        inner.extend_from_slice(message);
        let mut data = vec![0x7c];
        push_len(&mut data, inner.len());
        data.extend_from_slice(&inner);
        let answer = self.command(INS_GENERAL_AUTHENTICATE, ALG_ED25519, slot, &data)?;
        parse_signature(&answer)
    }

    /// VERIFY the PIV PIN (6 to 8 bytes, padded with FF to 8). Every buffer holding it is
    /// zeroized. The card answers 90 00, 63 CX (X tries left) or 69 83 (blocked).
    pub fn verify_pin(&mut self, pin: &[u8]) -> Result<(), ApduError> {
        if !(1..=8).contains(&pin.len()) {
            return Err(ApduError::Malformed("a PIN of 1 to 8 bytes"));
        }
        let mut data = zeroize::Zeroizing::new([0xffu8; 8]);
        data[..pin.len()].copy_from_slice(pin);
        self.command(INS_VERIFY, 0x00, 0x80, &data[..]).map(drop)
    }

    /// SELECT the PIV application (clears the PIN and management-key status).
    pub fn select_piv(&mut self) -> Result<(), ApduError> {
        self.command(INS_SELECT, 0x04, 0x00, &AID_PIV).map(drop)
    }

    /// Reconnects after the card was reset, without resetting it again.
    pub fn reconnect(&mut self) -> Result<(), ApduError> {
        self.card.reconnect(
            pcsc::ShareMode::Shared,
            pcsc::Protocols::T1,
            pcsc::Disposition::LeaveCard,
        )?;
        Ok(())
    }

    /// Deletes the key in `slot` (needs the management key).
    pub fn delete_key(&mut self, slot: u8) -> Result<(), ApduError> {
        self.command(INS_MOVE_KEY, 0xff, slot, &[]).map(drop)
    }

    /// One command: chained in 255-byte pieces (CLA 10) inside a PC/SC transaction, the
    /// answer collected with GET RESPONSE while the card says 61 XX.
    fn command(&mut self, ins: u8, p1: u8, p2: u8, data: &[u8]) -> Result<Vec<u8>, ApduError> {
        let tx = self.card.transaction()?;
        let mut buf = zeroize::Zeroizing::new(vec![0u8; 258]);
        let chunks: Vec<&[u8]> = if data.is_empty() {
            vec![&[][..]]
        } else {
            data.chunks(255).collect()
        };
        let mut answer = Vec::new();
        let mut sw = 0u16;
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            // Shaped like the crate's APDUs (and libykpiv's): Lc and data, no Le.
            // Without data, the four header bytes alone (as ykman sends DELETE KEY).
            let mut apdu =
                zeroize::Zeroizing::new(vec![if last { 0x00 } else { 0x10 }, ins, p1, p2]);
            if !chunk.is_empty() {
                apdu.push(chunk.len() as u8);
                apdu.extend_from_slice(chunk);
            }
            let (resp, status) = split_sw(tx.transmit(&apdu, &mut buf[..])?)?;
            sw = status;
            if !last && sw != 0x9000 {
                return Err(ApduError::Status(sw));
            }
            answer = resp.to_vec();
        }
        while sw >> 8 == 0x61 {
            let (resp, status) =
                split_sw(tx.transmit(&[0x00, INS_GET_RESPONSE, 0x00, 0x00, 0x00], &mut buf[..])?)?;
            answer.extend_from_slice(resp);
            if answer.len() > MAX_ANSWER {
                return Err(ApduError::Malformed("an answer longer than 64 KiB"));
            }
            sw = status;
        }
        drop(tx);
        if sw == 0x9000 {
            Ok(answer)
        } else {
            Err(ApduError::Status(sw))
        }
    }
}

/// The signature in a GENERAL AUTHENTICATE answer: `7C { 82 <64 bytes> }`, nothing more.
pub fn parse_signature(answer: &[u8]) -> Result<[u8; 64], ApduError> {
    let body = expect_tlv(answer, 0x7c).ok_or(ApduError::Malformed("no 7C template"))?;
    let sig = expect_tlv(body, 0x82).ok_or(ApduError::Malformed("no 82 response"))?;
    sig.try_into()
        .map_err(|_| ApduError::Malformed("the signature is not 64 bytes"))
}

/// An answer's data and status word (its last two bytes).
pub fn split_sw(r: &[u8]) -> Result<(&[u8], u16), ApduError> {
    if r.len() < 2 {
        return Err(ApduError::Malformed("answer shorter than a status word"));
    }
    let (data, sw) = r.split_at(r.len() - 2);
    Ok((data, u16::from_be_bytes([sw[0], sw[1]])))
}

/// Appends a BER-TLV length.
pub fn push_len(out: &mut Vec<u8>, n: usize) {
    match n {
        0..=0x7f => out.push(n as u8),
        0x80..=0xff => out.extend_from_slice(&[0x81, n as u8]),
        0x100..=0xffff => out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]),
        _ => {
            assert!(n <= 0xff_ffff, "BER length over 16 MiB");
            out.extend_from_slice(&[0x83, (n >> 16) as u8, (n >> 8) as u8, n as u8])
        }
    }
}

/// The value of a single TLV with tag `tag` that fills `data` exactly.
pub fn expect_tlv(data: &[u8], tag: u8) -> Option<&[u8]> {
    match split_tlv(data)? {
        (t, value, []) if t == tag => Some(value),
        _ => None,
    }
}

/// The first BER-TLV of `data` (one-byte tag, lengths up to 0xFFFF): (tag, value, rest).
pub fn split_tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = data.split_first()?;
    let (len, rest) = match rest.split_first()? {
        (&n, rest) if n < 0x80 => (n as usize, rest),
        (&0x81, rest) => (*rest.first()? as usize, rest.get(1..)?),
        (&0x82, rest) if rest.len() >= 2 => {
            (u16::from_be_bytes([rest[0], rest[1]]) as usize, &rest[2..])
        }
        _ => return None,
    };
    let value = rest.get(..len)?;
    Some((tag, value, &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ber_lengths_round_trip_at_every_boundary() {
        for n in [
            0usize, 1, 0x7f, 0x80, 0xfe, 0xff, 0x100, 0x101, 1014, 1015, 0xffff,
        ] {
            let mut tlv = vec![0x82];
            push_len(&mut tlv, n);
            tlv.extend(std::iter::repeat_n(7u8, n));
            assert_eq!(
                expect_tlv(&tlv, 0x82).map(<[u8]>::len),
                Some(n),
                "length {n}"
            );
            // The length bytes: 1 below 128, 2 up to 255, 3 from 256 (the crate's bug was 255).
            let hdr = tlv.len() - n - 1;
            assert_eq!(
                hdr,
                if n < 0x80 {
                    1
                } else if n <= 0xff {
                    2
                } else {
                    3
                },
                "{n}"
            );
        }
        assert_eq!(expect_tlv(&[0x82, 0x02, 1], 0x82), None, "short value");
        assert_eq!(
            expect_tlv(&[0x82, 0x01, 1, 2], 0x82),
            None,
            "trailing bytes"
        );
        assert_eq!(expect_tlv(&[0x81, 0x01, 1], 0x82), None, "other tag");
    }
}
