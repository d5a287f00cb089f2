//! mxhsm-piv-card: a virtual YubiKey 5.7 PIV card for tests.
//!
//! Connects to the vpcd driver (Debian `vsmartcard-vpcd`, loaded by `pcscd`)
//! and answers APDUs. vpcd framing: 2-byte big-endian length + payload. A
//! 1-byte payload is a control byte (0 power off, 1 power on, 2 reset,
//! 4 "send ATR"); anything longer is a command APDU answered with
//! `data || SW1 SW2`.

mod card;
mod der;

use card::{Card, Persistent, hex};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::linux::net::TcpStreamExt;
use std::path::PathBuf;
use std::time::Duration;

/// YubiKey 5 NFC ATR.
const ATR: &[u8] = &[
    0x3b, 0xfd, 0x13, 0x00, 0x00, 0x81, 0x31, 0xfe, 0x15, 0x80, 0x73, 0xc0, 0x21, 0xc0, 0x57,
    0x59, 0x75, 0x62, 0x69, 0x4b, 0x65, 0x79, 0x40,
];

const USAGE: &str = "\
usage: mxhsm-piv-card [options]
  --host HOST             vpcd host (default 127.0.0.1)
  --port N                vpcd port (default 35963)
  --serial N              card serial (default 12345678)
  --state FILE            load/persist keys, PINs and counters as JSON
  --attestation-ca FILE   write the attestation CA certificate (PEM)
  --verbose               log every APDU to stderr
  --once                  exit when the vpcd connection drops (no reconnect)";

fn main() {
    let mut host = "127.0.0.1".to_string();
    let mut port: u16 = 35963;
    let mut serial: Option<u32> = None;
    let mut state: Option<PathBuf> = None;
    let mut ca_out: Option<PathBuf> = None;
    let mut verbose = false;
    let mut once = false;

    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("{name} needs a value\n{USAGE}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--host" => host = val("--host"),
            "--port" => port = val("--port").parse().expect("--port: number"),
            "--serial" => serial = Some(val("--serial").parse().expect("--serial: number")),
            "--state" => state = Some(val("--state").into()),
            "--attestation-ca" => ca_out = Some(val("--attestation-ca").into()),
            "--verbose" | "-v" => verbose = true,
            "--once" => once = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => {
                eprintln!("unknown argument {other}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }

    let mut st = match &state {
        Some(path) if path.exists() => {
            let text = std::fs::read_to_string(path).expect("read state");
            let v: serde_json::Value = serde_json::from_str(&text).expect("state: JSON");
            Persistent::from_json(&v).expect("state: unexpected content")
        }
        _ => Persistent::new(serial.unwrap_or(12345678)),
    };
    if let Some(s) = serial {
        st.serial = s;
    }
    let mut card = Card::new(st, state.clone());
    card.verbose = verbose;
    if let Some(path) = &ca_out {
        std::fs::write(path, der::pem("CERTIFICATE", &card.ca_cert)).expect("write CA");
    }
    eprintln!(
        "piv-card: serial {} version 5.7.1, vpcd {host}:{port}{}",
        card.st.serial,
        state.as_ref().map(|p| format!(", state {}", p.display())).unwrap_or_default()
    );

    let mut warned = false;
    loop {
        match TcpStream::connect((host.as_str(), port)) {
            Ok(stream) => {
                warned = false;
                eprintln!("piv-card: connected to vpcd");
                card.power_reset();
                if let Err(e) = serve(stream, &mut card) {
                    eprintln!("piv-card: vpcd connection closed: {e}");
                }
                card.power_reset();
                if once {
                    return;
                }
            }
            Err(e) => {
                if !warned {
                    eprintln!("piv-card: cannot connect to vpcd ({e}); retrying");
                    warned = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn serve(mut s: TcpStream, card: &mut Card) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    loop {
        let mut len = [0u8; 2];
        // vpcd writes the length and the payload with two send() calls and no
        // TCP_NODELAY: acknowledge at once, or Nagle + delayed ACK add ~40 ms
        // to every APDU.
        let _ = s.set_quickack(true);
        s.read_exact(&mut len)?;
        let _ = s.set_quickack(true);
        let len = u16::from_be_bytes(len) as usize;
        let mut msg = vec![0u8; len];
        s.read_exact(&mut msg)?;
        let reply = match msg.as_slice() {
            [] => None,
            [0] | [1] | [2] => {
                if card.verbose {
                    eprintln!("ctl {}", msg[0]);
                }
                card.power_reset();
                None
            }
            [4] => Some(ATR.to_vec()),
            [_] => None,
            apdu => {
                let r = card.process(apdu);
                if card.verbose {
                    let show = |b: &[u8]| {
                        if b.len() > 64 {
                            format!("{}..({} bytes)", hex(&b[..64]), b.len())
                        } else {
                            hex(b)
                        }
                    };
                    eprintln!(">> {}\n<< {}", show(apdu), show(&r));
                }
                Some(r)
            }
        };
        if let Some(r) = reply {
            let mut out = (r.len() as u16).to_be_bytes().to_vec();
            out.extend(r);
            s.write_all(&out)?;
        }
    }
}
