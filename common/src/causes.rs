//! An error in words with its causes, each said once: what a user reads
//! when a TLS handshake, a credential chain or a transport fails.

use std::error::Error;

/// `msg`, then each cause in `source`'s chain not already in the text
/// (transport errors repeat their cause in their own message).
pub fn with_causes(mut msg: String, mut source: Option<&(dyn Error + 'static)>) -> String {
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl Error for E {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let e = E(
            "connect failed: refused",
            Some(Box::new(E(
                "refused",
                Some(Box::new(E("os error 111", None))),
            ))),
        );
        assert_eq!(
            with_causes(e.to_string(), e.source()),
            "connect failed: refused: os error 111"
        );
    }
}
