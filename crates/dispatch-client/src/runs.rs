//! Runs and job executions: async calls, their records, logs, cancel, redrive and purge;
//! job templates executed, their executions listed, followed and cancelled.

use dispatch_core::{JobExecution, Logs, Run};
use reqwest::Method;
use serde_json::value::RawValue;

use crate::{Client, Result, RunQuery};

impl Client {
    /// Accepts an async run (`?wait=false`): the 202's `{"id", "status", …}`.
    pub async fn exec_async(
        &self,
        function: &str,
        input: &RawValue,
        callback_url: Option<&str>,
    ) -> Result<serde_json::Value> {
        let url = self.ns_url(&self.namespace, &format!("functions/{function}/runs"));
        let mut body = format!("{{\"input\":{}", input.get());
        if let Some(cb) = callback_url {
            body.push_str(",\"callbackUrl\":");
            body.push_str(&serde_json::to_string(cb).unwrap_or_default());
        }
        body.push('}');
        let rb = self
            .request(Method::POST, &url)
            .query(&[("wait", "false")])
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        self.json(rb, &url).await
    }

    /// Cancels a queued or running async run.
    pub async fn cancel_run(&self, id: &str) -> Result<Run> {
        let url = self.ns_url(&self.namespace, &format!("runs/{id}"));
        self.json(self.request(Method::DELETE, &url), &url).await
    }

    /// Re-queues a DEAD run.
    pub async fn redrive_run(&self, id: &str) -> Result<Run> {
        let url = self.ns_url(&self.namespace, &format!("runs/{id}/redrive"));
        self.json(self.request(Method::POST, &url), &url).await
    }

    /// Re-queues every DEAD run (of one function).
    pub async fn redrive_all(&self, function: Option<&str>) -> Result<serde_json::Value> {
        let url = self.ns_url(&self.namespace, "runs/redrive");
        let mut rb = self.request(Method::POST, &url);
        if let Some(f) = function {
            rb = rb.query(&[("function", f)]);
        }
        self.json(rb, &url).await
    }

    /// Deletes finished runs (of one function / status).
    pub async fn purge_runs(
        &self,
        function: Option<&str>,
        status: Option<&str>,
    ) -> Result<serde_json::Value> {
        let url = self.ns_url(&self.namespace, "runs");
        let mut params = Vec::new();
        if let Some(f) = function {
            params.push(("function", f));
        }
        if let Some(s) = status {
            params.push(("status", s));
        }
        self.json(self.request(Method::DELETE, &url).query(&params), &url)
            .await
    }

    /// `PUT /execute/{ns}/{template}` with `payload` as the body: `{"uuid", "name",
    /// "namespace", "status"}`.
    pub async fn execute(&self, template: &str, payload: Vec<u8>) -> Result<serde_json::Value> {
        let url = format!("{}/execute/{}/{template}", self.base, self.namespace);
        self.json(self.request(Method::PUT, &url).body(payload), &url)
            .await
    }

    pub async fn list_jobs(&self, template: Option<&str>) -> Result<Vec<JobExecution>> {
        let url = self.ns_url(&self.namespace, "jobexecutions");
        let mut rb = self.request(Method::GET, &url);
        if let Some(t) = template {
            rb = rb.query(&[("template", t)]);
        }
        self.json(rb, &url).await
    }

    pub async fn get_job(&self, uuid: &str) -> Result<JobExecution> {
        let url = self.ns_url(&self.namespace, &format!("jobexecutions/{uuid}"));
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// The execution of that name (or UUID) in `ns`, if there is one.
    pub async fn get_job_in(&self, ns: &str, name: &str) -> Result<Option<JobExecution>> {
        let url = self.ns_url(ns, &format!("jobexecutions/{name}"));
        match self.json(self.request(Method::GET, &url), &url).await {
            Ok(j) => Ok(Some(j)),
            Err(e) if e.code() == Some("NotFound") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts an execution from a `JobExecution` resource (dispatcher's shape); answers it
    /// as a resource.
    pub async fn create_job_execution(
        &self,
        ns: &str,
        resource: &serde_json::Value,
    ) -> Result<serde_json::Value> {
        let url = self.ns_url(ns, "jobexecutions");
        self.json(self.request(Method::POST, &url).json(resource), &url)
            .await
    }

    /// The logs so far (while it runs) or all of them.
    pub async fn job_logs(&self, uuid: &str) -> Result<Logs> {
        let url = self.ns_url(&self.namespace, &format!("jobexecutions/{uuid}/logs"));
        self.json(self.request(Method::GET, &url), &url).await
    }

    pub async fn cancel_job(&self, uuid: &str) -> Result<JobExecution> {
        self.cancel_job_in(&self.namespace, uuid).await
    }

    /// Cancels the execution of that name (or UUID) in `ns`.
    pub async fn cancel_job_in(&self, ns: &str, uuid: &str) -> Result<JobExecution> {
        let url = self.ns_url(ns, &format!("jobexecutions/{uuid}"));
        self.json(self.request(Method::DELETE, &url), &url).await
    }

    pub async fn list_runs(&self, q: &RunQuery) -> Result<Vec<Run>> {
        let url = self.ns_url(&self.namespace, "runs");
        let mut params: Vec<(&str, String)> = Vec::new();
        if let Some(f) = &q.function {
            params.push(("function", f.clone()));
        }
        if let Some(s) = &q.status {
            params.push(("status", s.clone()));
        }
        if let Some(l) = q.limit {
            params.push(("limit", l.to_string()));
        }
        for (name, v) in [
            ("after", &q.after),
            ("since", &q.since),
            ("until", &q.until),
        ] {
            if let Some(v) = v {
                params.push((name, v.clone()));
            }
        }
        self.json(self.request(Method::GET, &url).query(&params), &url)
            .await
    }

    /// A function's async runs accepted and not final, its bound, and its 429s since start.
    pub async fn function_queue(&self, name: &str) -> Result<dispatch_core::run::FunctionQueue> {
        let url = self.ns_url(&self.namespace, &format!("functions/{name}/queue"));
        self.json(self.request(Method::GET, &url), &url).await
    }

    pub async fn get_run(&self, id: &str) -> Result<Run> {
        let url = self.ns_url(&self.namespace, &format!("runs/{id}"));
        self.json(self.request(Method::GET, &url), &url).await
    }

    pub async fn run_logs(&self, id: &str) -> Result<Logs> {
        let url = self.ns_url(&self.namespace, &format!("runs/{id}/logs"));
        self.json(self.request(Method::GET, &url), &url).await
    }

    /// Follows the lines of the run's attempt running now, as they are printed: each goes to
    /// `on_line(stream, line)`. Returns when the attempt ends (at once when none runs on the
    /// server asked); `Ok(false)` when the server said this follower fell behind (the rest
    /// is in the record).
    pub async fn follow_run_logs(
        &self,
        id: &str,
        mut on_line: impl FnMut(&str, &str),
    ) -> Result<bool> {
        let url = self.ns_url(&self.namespace, &format!("runs/{id}/logs"));
        let mut complete = true;
        self.each_json_line(&url, |v| {
            if v["lagged"] == true {
                complete = false;
                return false;
            }
            if let (Some(stream), Some(text)) = (v["stream"].as_str(), v["line"].as_str()) {
                on_line(stream, text);
            }
            true
        })
        .await?;
        Ok(complete)
    }

    /// Follows every call of function `name` from now on: each line it prints goes to `on`
    /// as it is printed (with its run's id), and so does word of lines this follower missed
    /// for falling behind. Returns when the server ends the following (it shuts down).
    pub async fn follow_function_logs(
        &self,
        name: &str,
        mut on: impl FnMut(FunctionLog<'_>),
    ) -> Result<()> {
        let url = self.ns_url(&self.namespace, &format!("functions/{name}/logs"));
        self.each_json_line(&url, |v| {
            if let Some(n) = v["lagged"].as_u64() {
                on(FunctionLog::Lagged(n));
            } else if let (Some(run), Some(stream), Some(line)) =
                (v["run"].as_str(), v["stream"].as_str(), v["line"].as_str())
            {
                on(FunctionLog::Line { run, stream, line });
            }
            true
        })
        .await
    }

    /// GETs `url?follow=true` and hands each line of its NDJSON answer to `on` as it comes,
    /// until the answer ends or `on` says `false`.
    async fn each_json_line(
        &self,
        url: &str,
        mut on: impl FnMut(&serde_json::Value) -> bool,
    ) -> Result<()> {
        let rb = self.request(Method::GET, url).query(&[("follow", "true")]);
        let mut resp = self.send(rb, url).await?;
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|source| crate::ClientError::Http {
                url: url.to_string(),
                source,
            })?
        {
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let v: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
                if !on(&v) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// What following a function brings: a line one of its calls printed, or how many lines
/// this follower missed for falling behind (the runs' records keep them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionLog<'a> {
    Line {
        run: &'a str,
        stream: &'a str,
        line: &'a str,
    },
    Lagged(u64),
}
