//! `--trace-ui`: the console links a flow's latest trace ID to a trace viewer (Jaeger, Tempo,
//! …) by expanding a URL template such as `http://jaeger:16686/trace/{trace_id}`.
//!
//! The template is checked when the control plane starts, not when a link is drawn: a typo
//! should stop the start with a message, not leave the console with broken links.

/// The placeholder a template must contain.
pub const PLACEHOLDER: &str = "{trace_id}";

/// A checked trace-viewer URL template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceUi {
    template: String,
}

/// Why a `--trace-ui` template was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceUiError {
    #[error(
        "--trace-ui {0:?} has no {PLACEHOLDER} placeholder: write where the trace ID goes, e.g. http://jaeger:16686/trace/{PLACEHOLDER}"
    )]
    NoPlaceholder(String),
    #[error(
        "--trace-ui {0:?} is not an http:// or https:// URL with a host: the console links to it, so give the trace viewer's address, e.g. http://jaeger:16686/trace/{PLACEHOLDER}"
    )]
    NotHttp(String),
}

impl TraceUi {
    pub fn parse(template: &str) -> Result<Self, TraceUiError> {
        if !template.contains(PLACEHOLDER) {
            return Err(TraceUiError::NoPlaceholder(template.to_string()));
        }
        // Checked as a URI with a sample ID in place of the placeholder (braces are not URI
        // characters); only http(s) with an authority, so a link cannot be `javascript:`.
        let sample = template.replace(PLACEHOLDER, "0af7651916cd43dd8448eb211c80319c");
        let ok = sample.parse::<http::Uri>().is_ok_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some_and(|h| !h.is_empty())
        });
        if !ok {
            return Err(TraceUiError::NotHttp(template.to_string()));
        }
        Ok(Self {
            template: template.to_string(),
        })
    }

    /// The link to `trace_id` (hex, as flows carry it: the store drops any other).
    pub fn link(&self, trace_id: &str) -> String {
        self.template.replace(PLACEHOLDER, trace_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_checked_and_expanded() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        for (template, want) in [
            (
                "http://jaeger:16686/trace/{trace_id}",
                Ok("http://jaeger:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736".to_string()),
            ),
            (
                "https://grafana.example/explore?traceId={trace_id}&x=1",
                Ok(format!("https://grafana.example/explore?traceId={id}&x=1")),
            ),
            (
                "http://jaeger:16686/trace/",
                Err(TraceUiError::NoPlaceholder(
                    "http://jaeger:16686/trace/".into(),
                )),
            ),
            (
                "javascript:alert({trace_id})",
                Err(TraceUiError::NotHttp("javascript:alert({trace_id})".into())),
            ),
            (
                "jaeger:16686/trace/{trace_id}",
                Err(TraceUiError::NotHttp(
                    "jaeger:16686/trace/{trace_id}".into(),
                )),
            ),
            (
                "ftp://host/{trace_id}",
                Err(TraceUiError::NotHttp("ftp://host/{trace_id}".into())),
            ),
            (
                "http:///{trace_id}",
                Err(TraceUiError::NotHttp("http:///{trace_id}".into())),
            ),
            (
                "http://host/a b/{trace_id}",
                Err(TraceUiError::NotHttp("http://host/a b/{trace_id}".into())),
            ),
        ] {
            assert_eq!(
                TraceUi::parse(template).map(|t| t.link(id)),
                want,
                "{template}"
            );
        }
        let e = TraceUi::parse("http://x/").unwrap_err().to_string();
        assert!(
            e.contains("{trace_id}") && e.contains("e.g. http://"),
            "{e}"
        );
    }
}
